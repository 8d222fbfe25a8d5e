"""Shared test helpers: waiting on conditions (never bare sleeps) and checking outcomes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import orjson
import redis

from sluice.protocol import GROUP, dead_key, jobs_key, result_key

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
