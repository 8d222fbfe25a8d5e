"""The Ray Serve deployment: one per model, each replica a consumer of the model's stream.

Serve gives us placement, restarts and health checks; the work itself comes from Redis, not
from Serve requests: `__init__` loads the runner and starts the worker's loops, `check_health`
fails when a loop has died, and `__del__` (Serve's graceful stop) stops pulling and finishes the
batches already pulled. The only Serve method callers use is `info()`, for status and tests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from sluice.autoscale import ServiceMeter
from sluice.logs import route_logs
from sluice.metrics import Metrics, RayMetrics
from sluice.placement import assigned_cpus, fit_threads, run_at_full_priority
from sluice.queue import StreamQueue, connect
from sluice.runners import build_runner
from sluice.settings import ReplicaConfig
from sluice.worker import Worker

log = logging.getLogger(__name__)


def consumer_name() -> str:
    """Unique per replica process; the host and pid make `sluice status` readable."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@serve.deployment(
    name="Replica",
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
    max_ongoing_requests=16,
)
class Replica:
    """Pulls, batches, runs and answers one model's jobs."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        # Start-up milestones (epoch ms): the cold-start benchmark splits its time on these.
        self.lifecycle = {"init_ms": time.time() * 1000}
        self.config = ReplicaConfig.model_validate(config)
        route_logs(self.config.settings.log_level)
        self.nice = run_at_full_priority()
        self.cpus = assigned_cpus()
        model = fit_threads(self.config.model, self.cpus)
        runner = build_runner(model)
        # Loading takes seconds: off the event loop, so Serve's own calls stay answered.
        await asyncio.to_thread(runner.load)
        self.lifecycle["loaded_ms"] = time.time() * 1000
        settings = self.config.settings
        redis = connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            socket_timeout=settings.redis_socket_timeout_s,
        )
        queue = StreamQueue(redis, model.name, consumer_name(), self.config.settings.queue)
        self.consumer = queue.consumer  # as the group knows it (marked as one that beats)
        metrics = RayMetrics(model.name) if settings.metrics else Metrics()
        precision = getattr(runner, "precision", None)
        load_s = (self.lifecycle["loaded_ms"] - self.lifecycle["init_ms"]) / 1000
        loaded = functools.partial(
            metrics.loaded,
            load_s,
            runner.task,
            precision.dtype if precision else "fp32",
            model.device,
        )
        loaded()
        self.worker = Worker(queue, runner, model, self.config.settings.queue, metrics)
        self.worker.start()
        self._gauges_task = (
            asyncio.get_running_loop().create_task(_refresh_gauges(metrics, loaded, model.device))
            if settings.metrics
            else None
        )
        self.meter = ServiceMeter(self.worker.work_done, cpus=self.cpus or 0.0, gpus=_gpus())
        try:
            # Registered before Serve calls us ready, so SDK submits are admitted at once.
            await asyncio.wait_for(self.worker.ready.wait(), timeout=15)
        except TimeoutError:
            log.warning("redis unreachable at start; the replica keeps trying")
        self.lifecycle["ready_ms"] = time.time() * 1000
        log.info("replica %s serving %s (%s)", self.consumer, model.name, runner.describe())

    async def check_health(self) -> None:
        self.worker.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve hands these to the autoscaling policy (sluice.autoscale.BacklogPolicy)."""
        return self.meter.report()

    async def info(self) -> dict[str, Any]:
        """Facts about this replica: who it is, what it runs, what it has done."""
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "consumer": self.consumer,
            "nice": self.nice,
            "torch_threads": self.worker.model.torch_threads,
            "model": self.config.model.name,
            "runner": self.worker.runner.describe(),
            "stats": vars(self.worker.stats),
            "lifecycle": self.lifecycle,
        }

    async def __del__(self) -> None:
        if not hasattr(self, "worker"):
            return  # stopped while still loading (a downscale before it was ready)
        if self._gauges_task is not None:
            self._gauges_task.cancel()
        # Serve waits graceful_shutdown_timeout_s for us; keep a margin under it.
        await self.worker.stop(timeout_s=25.0)
        await self.worker.queue.redis.aclose()


def _gpus() -> float:
    """The GPUs Ray reserved for this replica (0 outside Ray or with none)."""
    try:
        resources = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]
        return float(resources.get("GPU", 0.0))
    except Exception:  # outside an actor
        return 0.0


async def _refresh_gauges(
    metrics: Metrics, loaded: Callable[[], None], device: str, every_s: float = 5.0
) -> None:
    """Set-once gauges (load time, replica info) set again every few seconds, and on a GPU
    its memory and utilisation sampled, for the replica's life: Ray's metrics agent can stop
    exporting a gauge nobody has set for a while, and a dashboard's "replicas now" then shows
    none (seen in a long test session)."""
    gpu = device.startswith("cuda")
    while True:
        try:
            loaded()
            if gpu:
                metrics.gpu(device)
        except Exception as exc:  # a metric must never take the replica down
            log.warning("gauges not refreshed (%r); not tried again", exc)
            return
        await asyncio.sleep(every_s)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder named in `deployments/*.yaml` (`import_path`).

    `args` holds `model` (ModelSettings fields) and optional `queue` overrides; the Redis URL
    comes from `SLUICE_REDIS_URL`. Validated here, so a bad config fails the deploy, loudly.
    """
    config = ReplicaConfig.from_args(args)
    app: Application = Replica.bind(config.model_dump(mode="json"))  # type: ignore[attr-defined]
    return app
