"""The embedded local stack: a redis-server child, a local Ray, the Serve apps of a config file.

Used by `sluice up`, `sluice demo` and the benchmarks. Everything it starts, it stops: a
`LocalStack` is a context manager, and Ctrl-C inside it unwinds through `__exit__`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlparse

import redis
import yaml

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to 0 and let the kernel choose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a TLS-only redis-server: its certificate and key, and the CA that
    clients verify it with (docs/security.md)."""

    cert_file: str
    key_file: str
    ca_file: str


RUN_DIR_ENV = "SLUICE_RUN_DIR"


class RedisServer:
    """A `redis-server` child process on 127.0.0.1, for the local stack and the tests.

    `acl_lines` (`ACL SETUSER ...` commands, as in docs/security.md) are applied as the
    `default` user once the server answers; `default` stays the unrestricted admin. With
    `tls`, the server listens on TLS only (`--port 0 --tls-port N`) and its URLs are
    `rediss://` ones that carry the CA file.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        acl_lines: Sequence[str] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed (make install runs apt-get install redis-server)"
            )
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = extra_args
        self.acl_lines = tuple(acl_lines)
        self.tls = tls
        # Under `sluice up`, inside the folder its supervisor removes however the stack ends.
        self.dir = tempfile.mkdtemp(prefix="sluice-redis-", dir=os.environ.get(RUN_DIR_ENV))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The admin's URL (the `default` user)."""
        return self.url_for()

    def url_for(self, user: str | None = None, password: str | None = None) -> str:
        """The URL of one ACL user (`default` when `user` is None)."""
        auth = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(self.tls.ca_file)}"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            self.tls.cert_file,
            "--tls-key-file",
            self.tls.key_file,
            "--tls-ca-cert-file",
            self.tls.ca_file,
            "--tls-auth-clients",
            "no",
        ]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            *self._listen_args(),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]
        # Its log in a file, not a pipe nobody reads: the reason it gives for exiting at start
        # (e.g. "Address already in use") is on stdout, and a full pipe would block it.
        log_path = Path(self.dir) / "redis-server.log"
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                lines = log_path.read_text(errors="replace").strip().splitlines()
                why = " / ".join(line.split(" # ", 1)[-1] for line in lines[-2:])
                raise RuntimeError(f"redis-server exited at start: {why or 'no reason given'}")
            if redis_answers(self.url, 0.2):
                self._apply_acl()
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def _apply_acl(self) -> None:
        if not self.acl_lines:
            return
        with redis.Redis.from_url(self.url) as admin:
            for line in self.acl_lines:
                admin.execute_command(*line.split())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalRedisCluster:
    """A Redis Cluster of `masters` cluster-enabled redis-server children on 127.0.0.1 (no
    replicas), joined by `redis-cli --cluster create`: for the tests and for trying
    `SLUICE_REDIS_CLUSTER` on one machine (docs/scaling.md). `url` names one node; a
    cluster client discovers the rest from it. `acl_lines` are applied on every node (ACL
    users are per node), as by `RedisServer`."""

    def __init__(self, masters: int = 3, *, acl_lines: Sequence[str] = ()) -> None:
        if masters < 3:
            raise ValueError(f"redis-cli --cluster create needs 3 masters or more, got {masters}")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed (it comes with redis-server)")
        self.cli = cli
        ports = _distinct_free_ports(2 * masters)
        # The bus port is chosen too (`cluster-port`, Redis 7): the default, port + 10000,
        # may be taken, or past 65535 for a high free port.
        self.servers = [
            RedisServer(
                port,
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-port",
                    str(bus),
                    "--cluster-node-timeout",
                    "5000",
                ),
                acl_lines=acl_lines,
            )
            for port, bus in zip(ports[:masters], ports[masters:], strict=True)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def url_for(self, user: str | None = None, password: str | None = None) -> str:
        return self.servers[0].url_for(user, password)

    def start(self, timeout_s: float = 30.0) -> LocalRedisCluster:
        deadline = time.monotonic() + timeout_s
        try:
            for server in self.servers:
                server.start()
            nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
            done = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *nodes,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            self._wait_ok(deadline)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _wait_ok(self, deadline: float) -> None:
        # Every node must agree before a client's first slot map is right everywhere.
        waiting = list(self.servers)
        while waiting:
            waiting = [s for s in waiting if not _cluster_ok(s.url)]
            if waiting and time.monotonic() > deadline:
                ports = [s.port for s in waiting]
                raise TimeoutError(f"redis cluster nodes {ports} not cluster_state:ok in time")
            if waiting:
                time.sleep(0.05)

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _cluster_ok(url: str) -> bool:
    with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
        # The raw reply: redis-py parses `client.cluster("INFO")` into a dict.
        info: Any = client.execute_command("CLUSTER", "INFO")
    return b"cluster_state:ok" in info


def load_config(path: str | Path) -> dict[str, Any]:
    """A Serve config file (the same YAML `serve run` takes), validated by Serve's schema."""
    from ray.serve.schema import ServeDeploySchema

    with open(path) as fh:
        raw = yaml.safe_load(fh)
    ServeDeploySchema.model_validate(raw)
    return dict(raw)


def served_models(config: dict[str, Any]) -> list[str]:
    return [
        str((app.get("args") or {}).get("model", {}).get("name", "minilm"))
        for app in config.get("applications", [])
    ]


class LocalStack:
    """redis-server (when none answers at the URL), local Ray, and the config's Serve apps."""

    def __init__(
        self,
        config_path: str | Path,
        *,
        redis_url: str,
        num_cpus: int | None = None,
        ready_timeout_s: float = 300.0,
        metrics_port: int | None = None,
    ) -> None:
        self.config = load_config(config_path)
        # Ray's metrics of every process on this node, replicas' included (docs/metrics.md);
        # None: a free port (tests and benchmarks run several stacks on one machine).
        self.metrics_port = metrics_port or free_port()
        self.redis_url = redis_url
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.ready_timeout_s = ready_timeout_s
        self.redis: RedisServer | None = None

    def __enter__(self) -> LocalStack:
        try:
            self._start_redis()
            self._start_serve()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start_redis(self) -> None:
        if redis_answers(self.redis_url):
            log.info("using the redis already answering at %s", self.redis_url)
            return
        parsed = urlparse(self.redis_url)
        if parsed.scheme != "redis" or parsed.hostname not in LOOPBACK:
            raise ConnectionError(f"no redis answers at {self.redis_url}, and it is not local")
        self.redis = RedisServer(parsed.port or 6379).start()
        log.info("started redis-server on 127.0.0.1:%d", self.redis.port)

    def _start_serve(self) -> None:
        import ray
        from ray.serve._private import api as serve_api
        from ray.serve.schema import ServeDeploySchema

        # Replicas read SLUICE_REDIS_URL; workers of a local Ray inherit this process's env.
        os.environ["SLUICE_REDIS_URL"] = self.redis_url
        # Ray starts workers at nice 15; a replica is the whole point of this machine, and at
        # nice 15 it loses CPU to redis-server and to Ray's own daemons (BENCHMARKS.md).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # A local Ray on loopback with token authentication on, as it should be: its notice
        # that it is on reads like a problem to a newcomer, so only its errors are shown.
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        ray.init(
            num_cpus=self.num_cpus,
            include_dashboard=False,
            namespace="serve",
            log_to_driver=False,
            _metrics_export_port=self.metrics_port,
        )
        schema = ServeDeploySchema.model_validate(self.config)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
        )
        # The declarative path, exactly what `serve run deployments/local.yaml` does.
        client.deploy_apps(schema, _blocking=False)
        wait_running([a.name for a in schema.applications], self.ready_timeout_s)

    def close(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                # Each app deleted and waited for: its replicas answer what they hold (their
                # graceful shutdown). Not serve.shutdown(): the controller kills itself inside
                # the call it answers, and Ray prints that as a failed task.
                for name in serve.status().applications:
                    serve.delete(name, _blocking=True)
            ray.shutdown()
        if self.redis is not None:
            self.redis.cleanup()
            self.redis = None


def wait_running(app_names: list[str], timeout_s: float) -> None:
    """Blocks until every named Serve app is RUNNING; raises on DEPLOY_FAILED or timeout."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status if name in apps else "MISSING" for name in app_names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = [n for n, s in states.items() if s == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError(f"Serve apps failed to deploy: {apps[failed[0]].message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve apps not running after {timeout_s}s: {states}")
        time.sleep(0.25)
