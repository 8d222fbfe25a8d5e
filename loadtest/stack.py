"""The stack a benchmark runs against: `sluice up`'s own `LocalStack` with one app, and what a
report says about the machine and the replica. Shared by the drain benchmark and the harness."""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from loadtest.report import machine_info
from sluice.stack import LocalStack, free_port

Json = dict[str, Any]


@contextmanager
def local_stack(config: Json, niceness: int | None) -> Iterator[str]:
    """`sluice up`'s own `LocalStack` (redis-server, Ray, Serve) with `config`, RUNNING; torn
    down on any exit, Ctrl-C and SIGTERM included (a second Ctrl-C cannot cut the teardown)."""
    if niceness is not None:
        os.environ["RAY_worker_niceness"] = str(niceness)  # Ray's default is 15

    def on_term(*_: object) -> None:
        raise SystemExit(143)

    term, on_int = signal.signal(signal.SIGTERM, on_term), signal.getsignal(signal.SIGINT)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="drain-") as fh:
        yaml.safe_dump(config, fh)
        # Logical CPUs, not the box's: the Sluice replica reserves 2 (local.yaml), and the
        # comparison's peer replica 1 more beside it (each target is measured alone while the
        # other idles). With 2, the peer's replica could never be placed and `compare` waited
        # for it for ever.
        url = f"redis://127.0.0.1:{free_port()}/0"
        stack = LocalStack(fh.name, redis_url=url, num_cpus=RAY_CPUS)
        try:
            stack.__enter__()  # closes what it started if it fails
            signal.signal(signal.SIGTERM, on_term)  # again: ray.init put its own (abort)
            yield stack.redis_url
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            stack.close()
            signal.signal(signal.SIGTERM, term)
            signal.signal(signal.SIGINT, on_int)


#: Logical CPUs of the benchmarks' Ray: room for the Sluice replica (2) and the peer's (1).
RAY_CPUS = 3


def serve_config(ns: argparse.Namespace) -> Json:
    """The Serve config file with only its first app, its model settings from the options."""
    config = yaml.safe_load(ns.config.read_text())
    app = config["applications"][0]
    app.setdefault("args", {})["model"] = {
        **(app["args"].get("model") or {}),
        **dict(model_path=ns.model_path, max_batch_size=ns.batch_size),
        **({"task": ns.task} if getattr(ns, "task", None) else {}),
        **dict(torch_threads=ns.threads, dtype=ns.dtype),
    }
    # One fixed replica: the comparisons are one replica against the bare model and the peer
    # (autoscaling has its own measurement, loadtest.scaling).
    for deployment in app.get("deployments", []):
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    return {**config, "applications": [app]}


def machine(app: str) -> Json:
    """CPU, versions, commit, and the replica's pid and niceness (Ray's workers: 15)."""
    import ray
    import transformers
    from ray import serve

    pid = serve.get_app_handle(app).info.remote().result()["pid"]
    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    return {
        **machine_info(),
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "replica": {"pid": pid, "nice": nice},
        "driver_nice": os.nice(0),
    }
