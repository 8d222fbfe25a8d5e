"""The producer's side of Redis: admitted submits (the `sluice` Function library) and cancels.

A submit is one FCALL that, atomically in Redis, refuses an unregistered model, answers an id
seen before without adding it again (idempotent), refuses a job when the model's queue is full
(`rejected`, counted in `sluice:{M}:stats`), and otherwise XADDs the entry. The SDK, the CLI
and the gateway submit through here; any other language can FCALL the same function
(docs/protocol.md).

A cancel is one `SET NX`: a `cancelled` result takes the result key if nothing took it first,
so the job's one final result is whichever of the two came first, and a replica that pulls
a cancelled job acks it without running it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from sluice import scripts
from sluice.connection import AsyncRedis, cluster_hint
from sluice.errors import JobCancelled, Overloaded, UnknownModel
from sluice.protocol import (
    Result,
    bell_key,
    error_result,
    inbox_key,
    info_key,
    job_key,
    jobs_key,
    lane_keys,
    result_key,
    scoped_id,
    stats_key,
    tenant_stats_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the submit function said of one job."""

    job_id: str
    status: str  # queued | duplicate | done | rejected
    entry_id: str | None = None
    depth: int | None = None
    max_depth: int | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def load_library(redis: AsyncRedis) -> None:
    """Loads (or upgrades) the `sluice` Function library; replicas do it at start.

    On a cluster, on every primary: FCALL runs on the node that owns its keys' slot, and
    redis-py sends FUNCTION LOAD to every primary."""
    if any(v != scripts.LIBRARY_VERSION for v in await _library_versions(redis)):
        await redis.function_load(scripts.LIBRARY, replace=True)
        log.info("loaded the sluice function library v%s", scripts.LIBRARY_VERSION)


async def _library_versions(redis: AsyncRedis) -> list[str | None]:
    """The library version each primary has loaded (None: not loaded)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # the node list; a no-op once known
        asks: list[Awaitable[Any]] = [
            redis.execute_command("FCALL_RO", "sluice_version", 0, target_nodes=node)
            for node in redis.get_primaries()
        ]
    else:
        asks = [redis.fcall_ro("sluice_version", 0)]
    replies = await asyncio.gather(*asks, return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException) and not isinstance(reply, ResponseError):
            raise reply
    # A ResponseError: the function does not exist there yet.
    return [None if isinstance(r, ResponseError) else _text(r) for r in replies]


def submit_keys(model: str, priority: str, job_id: str) -> list[str]:
    """The eight KEYS of FCALL sluice_submit, in order (docs/protocol.md)."""
    return [
        jobs_key(model, priority),
        *lane_keys(model),
        info_key(model),
        job_key(model, job_id),
        result_key(model, job_id),
        stats_key(model),
    ]


def enqueue_keys(model: str, tenant: str, job_id: str) -> list[str]:
    """The nine KEYS of FCALL sluice_enqueue (a tenant's submit), in order; `job_id` is the
    tenant's own id, scoped here."""
    scoped = scoped_id(tenant, job_id)
    return [
        inbox_key(model, tenant),
        bell_key(model),
        *lane_keys(model),
        info_key(model),
        job_key(model, scoped),
        result_key(model, scoped),
        tenant_stats_key(model, tenant),
    ]


async def submit(
    redis: AsyncRedis,
    model: str,
    jobs: Sequence[tuple[str, Mapping[str, str]]],
    priority: str = "normal",
    tenant: str | None = None,
) -> list[Admitted]:
    """Submits `(id, fields)` pairs through admission, in one round trip. A `tenant`
    submits into its own inbox (`sluice_enqueue`), its ids unscoped here (scoped by the
    replica that moves them into the lane)."""
    with cluster_hint():
        return await _submit(redis, model, jobs, priority, tenant)


async def _submit(
    redis: AsyncRedis,
    model: str,
    jobs: Sequence[tuple[str, Mapping[str, str]]],
    priority: str,
    tenant: str | None,
) -> list[Admitted]:
    replies = await _fcall_all(redis, model, jobs, priority, tenant)
    if replies and isinstance(replies[0], ResponseError) and "not found" in str(replies[0]):
        # A Redis that restarted empty: load the library and try once more.
        await _reload_library(redis, model, jobs[0][0])
        replies = await _fcall_all(redis, model, jobs, priority, tenant)
    out = []
    for (job_id, _), reply in zip(jobs, replies, strict=True):
        if isinstance(reply, Exception):
            raise reply
        status = _text(reply[0])
        if status == "unknown_model":
            raise UnknownModel(
                f"no model {model!r} is registered in this Redis (a replica registers its "
                "model when it starts; `sluice status` lists them)",
                job_id=job_id,
            )
        if status == "rejected":
            depth, limit = int(reply[1]), int(reply[2])
            out.append(Admitted(job_id, status, depth=depth, max_depth=limit))
        else:
            out.append(Admitted(job_id, status, _text(reply[1]) if len(reply) > 1 else None))
    return out


async def _reload_library(redis: AsyncRedis, model: str, job_id: str) -> None:
    try:
        await load_library(redis)
    except NoPermissionError as exc:
        # The least-privilege producer may not FUNCTION LOAD (docs/security.md): only a
        # replica loads the library, when it registers its model.
        raise UnknownModel(
            f"no model {model!r} is registered in this Redis: the sluice function library "
            "is not loaded, so no replica has started since Redis was emptied (a replica "
            f"loads it when it registers its model; this Redis user may not: {exc})",
            job_id=job_id,
        ) from exc


async def _fcall_all(
    redis: AsyncRedis,
    model: str,
    jobs: Sequence[tuple[str, Mapping[str, str]]],
    priority: str,
    tenant: str | None,
) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        route: dict[str, Any] = {}
        if isinstance(redis, RedisCluster):
            # All on the node of the model's slot, named here: else redis-py asks a node for
            # each FCALL's keys (COMMAND GETKEYS), a round trip per job. After a MOVED it
            # routes the call itself.
            route["target_nodes"] = redis.get_node_from_key(jobs_key(model))
        for job_id, fields in jobs:
            if tenant is None:
                function, keys = "sluice_submit", submit_keys(model, priority, job_id)
                args = [x for kv in fields.items() for x in kv]
            else:
                function, keys = "sluice_enqueue", enqueue_keys(model, tenant, job_id)
                args = [x for kv in fields.items() for x in kv] + ["priority", priority]
            pipe.execute_command("FCALL", function, len(keys), *keys, *args, **route)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


def raise_if_rejected(model: str, admitted: Sequence[Admitted]) -> None:
    """`Overloaded` naming what was queued and what was not, if any job was refused."""
    refused = [a for a in admitted if a.status == "rejected"]
    if not refused:
        return
    first = refused[0]
    raise Overloaded(
        f"{model}: {len(refused)} of {len(admitted)} jobs rejected, the queue holds "
        f"{first.depth} jobs (max_queue_depth {first.max_depth}); retry later",
        job_id=first.job_id,
        accepted=[a.job_id for a in admitted if a.status != "rejected"],
        rejected=[a.job_id for a in refused],
    )


@dataclass(frozen=True, slots=True)
class Known:
    """What Redis holds of one job id, before anything is done to it."""

    result: Result | None  # its final result, while stored (result_ttl_s)
    queued: bool  # admission's dedupe record: it was submitted through admission
    registered: bool  # the model is registered (a replica has started for it)


async def lookup(redis: AsyncRedis, model: str, job_id: str) -> Known:
    """The job's stored result, its dedupe record and its model's registration, in one round
    trip: what tells a typo from a queued job before a cancel, which would answer any id."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(result_key(model, job_id))
        pipe.exists(job_key(model, job_id))
        pipe.exists(info_key(model))
        raw, queued, registered = await pipe.execute()
    return Known(None if raw is None else Result.from_json(raw), bool(queued), bool(registered))


async def cancel(redis: AsyncRedis, model: str, job_id: str, ttl_s: int) -> Result:
    """Cancels a job unless it has a final result already; returns its final result.

    An id with no job yet is cancelled all the same: when it arrives it is answered
    `cancelled` without running (so a cancel racing its own submit still wins)."""
    cancelled = error_result(model, job_id, JobCancelled("cancelled by request"))
    previous: Any = await redis.set(
        result_key(model, job_id), cancelled.to_json(), nx=True, ex=ttl_s, get=True
    )
    return cancelled if previous is None else Result.from_json(previous)
