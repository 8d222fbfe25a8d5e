"""The Ray head of the compose stack: starts Ray, deploys a Serve config, stops both gracefully.

    python docker/ray_head.py [--metrics-export-port 9109] [--num-cpus N|auto]
                              [--dashboard-port 8265] [--ray-start-arg ARG ...] CONFIG

1. `ray start --head --block` as a child process: Ray's metrics of every process on this node
   at --metrics-export-port (Prometheus scrapes it, docs/metrics.md), the dashboard on
   127.0.0.1 only (`serve deploy` talks to it; nothing outside the container needs it), and
   each --ray-start-arg as one more argument (`make compose-test` runs the stack on the host's
   network, so it names Ray's ports and `--node-ip-address=127.0.0.1` so). With
   RAY_AUTH_MODE=token (docker-compose.yml sets it), Ray's own ports ask for a token: one is
   made first if ~/.ray/auth_token has none, and every Ray process here reads it there.
2. `serve deploy CONFIG`, once every variable that an application's `runtime_env.env_vars`
   names as `${NAME}` is set: Ray would expand an unset one to "" and the application would
   start with a blank setting (deployments/compose.yaml gives the gateway its Redis URL so).
3. Waits. On SIGTERM (`docker stop`) or SIGINT: shuts Serve down first, so that replicas
   finish and ack the batches they pulled (graceful_shutdown_timeout_s), then Ray. If a Ray
   process dies on its own, `ray start --block` ends and so does this, non-zero: compose's
   restart policy starts the container again.

Every Ray process started here inherits this process's environment: the replicas read
SLUICE_REDIS_URL (the `sluice-worker` user), the autoscaling policy SLUICE_SCALER_REDIS_URL
(`sluice-scaler`), the gateway SLUICE_GATEWAY_REDIS_URL (`sluice-producer`, through its
runtime_env) and SLUICE_API_KEYS.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("ray_head")

DASHBOARD_PORT = 8265
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 45.0  # Ray's own drain on SIGTERM waits 30 s at most


def referenced_variables(config: dict[str, Any]) -> set[str]:
    """The variables that the applications' `runtime_env.env_vars` name as `${NAME}`."""
    return {
        name
        for app in config.get("applications", [])
        for value in ((app.get("runtime_env") or {}).get("env_vars") or {}).values()
        for name in re.findall(r"\$\{(\w+)\}", str(value))
    }


def check_environment(config: dict[str, Any], env: Mapping[str, str]) -> None:
    """Raises if a variable the config's runtime_envs refer to is unset or empty in `env`."""
    missing = sorted(name for name in referenced_variables(config) if not env.get(name))
    if missing:
        raise ValueError(
            f"{', '.join(missing)} not set, and the Serve config's runtime_env refers to it"
        )


def ensure_auth_token(env: Mapping[str, str]) -> None:
    """In token mode, writes a token to ~/.ray/auth_token unless one is there (never logged)."""
    if env.get("RAY_AUTH_MODE", "").lower() == "token":
        subprocess.run(
            ["ray", "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL
        )


def dashboard_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def start_ray(
    metrics_port: int,
    num_cpus: str,
    dashboard_port: int = DASHBOARD_PORT,
    extra: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    command = [
        "ray", "start", "--head", "--block",
        f"--metrics-export-port={metrics_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus != "auto":
        command.append(f"--num-cpus={int(num_cpus)}")
    command += extra
    log.info("starting Ray: %s", " ".join(command))
    return subprocess.Popen(command)


def wait_for_dashboard(
    ray: subprocess.Popen[bytes], url: str, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Blocks until Ray's dashboard at `url` answers (`serve deploy` goes through it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ray.poll() is not None:
            raise RuntimeError(f"Ray exited while starting (status {ray.returncode})")
        try:
            # A path that needs no token: `ray start` turns Ray's token authentication on, and
            # `serve deploy` sends the token that it wrote to ~/.ray/auth_token.
            with urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray's dashboard not up after {timeout_s:.0f}s") from None
            time.sleep(1)


def deploy(config_path: Path, config: dict[str, Any], url: str) -> None:
    subprocess.run(["serve", "deploy", "--address", url, str(config_path)], check=True)
    apps = ", ".join(app["name"] for app in config["applications"])
    log.info("deployed %s (%s); `serve status` shows their state", config_path, apps)


def stop(ray: subprocess.Popen[bytes]) -> None:
    """Serve first (replicas finish their pulled batches), then every Ray process."""
    import ray as ray_api
    from ray import serve

    log.info("stopping Serve: replicas finish and ack what they pulled")
    try:
        ray_api.init(address="auto", log_to_driver=False)
        serve.shutdown()  # type: ignore[no-untyped-call]
    except Exception:
        log.exception("Serve did not shut down cleanly; stopping Ray all the same")
    finally:
        ray_api.shutdown()
    # Then `ray start --block` stops the node: on SIGTERM it drains the node through the GCS
    # (at once: Serve is down) and ends Ray's processes. Signalled after `ray stop` instead, it
    # would find the GCS gone and wait out its 30 s drain timeout on every stop.
    ray.terminate()
    try:
        ray.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("`ray start --block` still running after %.0f s: killed", STOP_TIMEOUT_S)
        ray.kill()
    subprocess.run(["ray", "stop"], check=False)  # whatever Ray process is left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("config", type=Path, help="the Serve config to deploy")
    parser.add_argument("--metrics-export-port", type=int, default=9109, help="(9109)")
    parser.add_argument("--num-cpus", default="auto", help="CPUs Ray offers (auto: detected)")
    parser.add_argument(
        "--dashboard-port", type=int, default=DASHBOARD_PORT, help=f"({DASHBOARD_PORT})"
    )
    parser.add_argument(
        "--ray-start-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `ray start`, e.g. --ray-start-arg=--port=6380 (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s ray_head: %(message)s"
    )

    config = yaml.safe_load(args.config.read_text())
    try:
        check_environment(config, os.environ)  # before Ray: a missing setting fails at once
    except ValueError as exc:
        log.error("%s", exc)
        return 2

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())

    ensure_auth_token(os.environ)
    ray = start_ray(
        args.metrics_export_port, args.num_cpus, args.dashboard_port, args.ray_start_arg
    )
    url = dashboard_url(args.dashboard_port)
    try:
        wait_for_dashboard(ray, url)
        deploy(args.config, config, url)
    except BaseException:
        stop(ray)
        raise
    while not stopping.wait(1.0):
        if ray.poll() is not None:
            log.error("Ray exited (status %s): the container stops", ray.returncode)
            return 1
    stop(ray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
