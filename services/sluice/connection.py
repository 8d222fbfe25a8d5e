"""Connections to Redis: one server, or a Redis Cluster (`Settings.redis_cluster`).

Every key of one model carries the hash tag `{M}`, so a model's multi-key commands, scripts and
its result-and-ack step all run on the one node that owns its slot; the models set and a
client's reply stream live in slots of their own and are only ever touched by single-key
commands or non-transactional pipelines, which a cluster client splits by node. What a cluster
needs beyond that is here:

- redis-py refuses `Script` objects in a cluster pipeline (it cannot load a script on the
  nodes first, as its plain pipeline does): `wire.run_scripts` sends EVALSHA itself and
  reruns the calls a node answered NOSCRIPT once the script is loaded on every primary.
- A cluster that cannot be reached at all is an outage, a `redis.ConnectionError` that callers
  retry, like one server that is down; a URL that names no cluster (or a cluster reached in
  single-server mode) is a `RedisModeError`, which nobody retries.

Elsewhere: the replica's batch writes go through `wire.send_many` (one write, one read pass;
a non-transactional pipeline on a cluster, never MULTI, which redis-py runs slowly there), and
`admission.load_library` loads the function library on every primary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, TypeAlias, overload

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.exceptions import (
    MovedError,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
)

AsyncRedis: TypeAlias = aioredis.Redis | AsyncRedisCluster
SyncRedis: TypeAlias = redis.Redis | SyncRedisCluster

_OPTIONS: dict[str, Any] = {
    "decode_responses": False,
    "socket_connect_timeout": 5,
    # A reply that never comes (a stalled server, a half-open link) fails the call instead of
    # hanging it: every caller retries. Replicas set Settings.redis_socket_timeout_s, which
    # must exceed their blocking pull's block_ms.
    "socket_timeout": 10,
    "socket_keepalive": True,
    "health_check_interval": 30,
}


class RedisModeError(RuntimeError):
    """The Redis at the URL is not what `redis_cluster` says: a cluster reached as one server,
    or one server reached as a cluster. A configuration error: retrying cannot fix it."""


class _Cluster(AsyncRedisCluster):
    """redis-py's asyncio cluster client, its discovery errors made plain (it raises a bare
    `RedisClusterException`, which is no `RedisError`, so an unreachable cluster would look
    like a bug to the retry loops)."""

    async def initialize(self, *args: Any, **kwargs: Any) -> _Cluster:
        try:
            await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise _plain(exc) from exc
        return self


def _plain(exc: RedisClusterException) -> Exception:
    cause: BaseException = exc
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner  # redis-py wraps the node's own answer twice
    if isinstance(cause, NoPermissionError):
        return NoPermissionError(
            f"this Redis user may not read the cluster's slot map ({cause}): a cluster client "
            "needs +cluster|slots and +command (docs/scaling.md)"
        )
    if isinstance(cause, ResponseError):  # CLUSTER SLOTS refused: cluster support disabled
        return RedisModeError(
            f"redis_cluster is set but this Redis is not a cluster ({cause}); unset "
            "SLUICE_REDIS_CLUSTER (Settings.redis_cluster) to use it as one server"
        )
    return redis.ConnectionError(str(exc))


@overload
def connect(url: str, *, cluster: Literal[False] = False, **kwargs: Any) -> aioredis.Redis: ...
@overload
def connect(url: str, *, cluster: bool, **kwargs: Any) -> AsyncRedis: ...


def connect(url: str, *, cluster: bool = False, **kwargs: Any) -> AsyncRedis:
    """An asyncio client with bytes replies (fields are decoded by the protocol module).

    `cluster`: `url` names any node of a Redis Cluster, and the client finds the others.
    """
    options = {**_OPTIONS, **kwargs}
    client: AsyncRedis
    if cluster:
        client = _Cluster.from_url(url, **options)
    else:
        client = aioredis.Redis.from_url(url, **options)
    _check_bytes_replies(client)
    return client


def _check_bytes_replies(client: AsyncRedis) -> None:
    """Options in a URL's query win over `connect`'s own: `?decode_responses=true` would make
    replies str where every caller (the replica's writer above all) reads bytes."""
    pool = getattr(client, "connection_pool", None)
    kwargs = pool.connection_kwargs if pool else getattr(client, "connection_kwargs", {})
    # A cluster client keeps the URL's text ("true"); one server's, a bool.
    if str(kwargs.get("decode_responses", "")).lower() in ("1", "true", "yes", "on"):
        raise ValueError(
            "the Redis URL sets decode_responses: Sluice decodes replies itself and needs them "
            "as bytes; remove it from the URL"
        )


@overload
def connect_sync(url: str, *, cluster: Literal[False] = False, **kwargs: Any) -> redis.Redis: ...
@overload
def connect_sync(url: str, *, cluster: bool, **kwargs: Any) -> SyncRedis: ...


def connect_sync(url: str, *, cluster: bool = False, **kwargs: Any) -> SyncRedis:
    """The blocking twin of `connect`, for the CLI's operator commands."""
    options = {"socket_connect_timeout": 5, **kwargs}
    if cluster:
        return SyncRedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def is_cluster(client: AsyncRedis | SyncRedis) -> bool:
    return isinstance(client, AsyncRedisCluster | SyncRedisCluster)


@contextlib.contextmanager
def cluster_hint() -> Iterator[None]:
    """Turns MOVED into a `RedisModeError` that says what to set: only a cluster node says
    MOVED, and a client in single-server mode would pass it up as a plain `RedisError`,
    which the replica's loops retry forever."""
    try:
        yield
    except MovedError as exc:
        raise RedisModeError(
            f"this Redis is a Redis Cluster node ({exc}): set SLUICE_REDIS_CLUSTER=true "
            "(Settings.redis_cluster; the SDK's cluster=True) to use the whole cluster"
        ) from exc
