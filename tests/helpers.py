"""Shared test helpers: waiting on conditions (never bare sleeps), checking outcomes, and a
bare null replica for tests of what is around one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import orjson
import redis

from sluice.protocol import GROUP, dead_key, jobs_key, result_key
from sluice.settings import QueueSettings

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout_s: float = 60.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> T:
    """Polls `condition` until it returns something truthy; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def results_of(r: redis.Redis, model: str, ids: Iterable[str]) -> dict[str, dict | None]:
    """Each id's stored result (parsed), or None."""
    ids = list(ids)
    with r.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.get(result_key(model, job_id))
        raw = pipe.execute()
    return {i: (orjson.loads(v) if v is not None else None) for i, v in zip(ids, raw, strict=True)}


def wait_all_results(
    r: redis.Redis, model: str, ids: list[str], timeout_s: float = 120.0
) -> dict[str, dict]:
    def done() -> dict[str, dict] | None:
        res = results_of(r, model, ids)
        return res if all(v is not None for v in res.values()) else None  # type: ignore[return-value]

    return wait_for(done, timeout_s, 0.1, f"{len(ids)} results of {model}")


def dead_letters(r: redis.Redis, model: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(dead_key(model))
    ]


def group_pending(r: redis.Redis, model: str) -> int:
    groups = {g["name"].decode(): g for g in r.xinfo_groups(jobs_key(model))}
    return int(groups[GROUP]["pending"]) if GROUP in groups else 0


def xadd_jobs(
    r: redis.Redis, model: str, texts: list[str], prefix: str = "job", **extra: str
) -> list[str]:
    """Raw XADDs, as any producer would do them; returns the ids."""
    ids = [f"{prefix}-{i}" for i in range(len(texts))]
    with r.pipeline(transaction=False) as pipe:
        for job_id, text in zip(ids, texts, strict=True):
            pipe.xadd(
                jobs_key(model), {"id": job_id, "input": orjson.dumps({"text": text}), **extra}
            )
        pipe.execute()
    return ids


@contextlib.contextmanager
def null_replica(
    url: str, model: str, dim: int = 8, limits: QueueSettings | None = None
) -> Iterator[None]:
    """A bare replica pipeline (no Ray) with the null runner: registers `model` and answers
    its jobs at once with `dim`-float unit vectors, on a loop of its own, until the block
    ends; then the model stays registered with nobody serving it. For tests of what is
    around a replica (the CLI, the docs' examples), where a model's answer is beside the
    point."""
    from sluice.queue import StreamQueue, connect
    from sluice.runners.null import NullRunner
    from sluice.settings import ModelSettings
    from sluice.worker import Worker

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    settings = ModelSettings(name=model, task="null", model_path=f"null:{dim}", max_batch_size=64)
    limits = limits or QueueSettings(block_ms=100)
    queue = StreamQueue(connect(url), model, "cli-test", limits)

    async def start() -> Worker:
        runner = NullRunner(settings)
        runner.load()
        worker = Worker(queue, runner, settings, limits)
        worker.start()
        await asyncio.wait_for(worker.ready.wait(), 30)
        return worker

    async def stop(worker: Worker) -> None:
        await worker.stop(10)
        await queue.redis.aclose()

    worker = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(stop(worker), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
