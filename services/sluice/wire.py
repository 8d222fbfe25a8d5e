"""Many commands to one Redis server in one write, their replies read in one pass.

The replica's per-batch writes (a `SET … NX GET` per job, a reply push per job, the `XACK`s)
are many small commands. redis-py's pipeline costs ~15 µs of Python a command on this path
(packing each command in Python, then one timeout context and one parse call per reply), which
was the largest single cost of a job (docs/architecture.md, "Where a job's microseconds go").
Here the batch is packed by hiredis in C (`hiredis.pack_command`), sent with one write, and its
replies are read by the connection's own hiredis parser under one timeout for the batch.

Replies come back in order; an error reply is returned as its exception object (redis-py's
classes: `NoScriptError`, `NoPermissionError`, `ResponseError`...), never raised, like a
pipeline's `execute(raise_on_error=False)`. A lost connection, a timeout or a cancel raises,
and the connection is dropped rather than returned to the pool with replies still unread.

A cluster client has no one connection for a batch whose keys live on several nodes: there
`send_many` uses a non-transactional cluster pipeline, which splits the batch by node (the
replies as Redis sent them there too: tests/integration/test_redis_cluster.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import hiredis
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from sluice.connection import AsyncRedis

Arg: TypeAlias = bytes | str | int | float
Command: TypeAlias = Sequence[Arg]


#: hiredis' packer; its type stub wants a 1-tuple, where it packs a tuple of any length.
_pack_command = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)

#: Values this long are sent as they are, not copied into a packed command.
_OUT_OF_LINE_BYTES = 1024


def pack(commands: Sequence[Command]) -> list[bytes]:
    """The RESP bytes of the commands, in order, as parts to write one after the other.

    hiredis packs the small arguments in C; a long bytes value (a result) is a part of its
    own rather than copied into a packed command: hiredis packing a 4 KB value took ~6 µs,
    this ~3 (asyncio's transport still joins the parts once before its send, on 3.11)."""
    parts: list[bytes] = []
    for command in commands:
        args = tuple(command)
        long = [i for i, a in enumerate(args) if type(a) is bytes and len(a) > _OUT_OF_LINE_BYTES]
        if not long:
            parts.append(_pack_command(args))
            continue
        parts.append(b"*%d\r\n" % len(args))
        start = 0
        for i in long:
            if i > start:
                parts.append(_bulk_strings(args[start:i]))
            value = args[i]
            assert isinstance(value, bytes)
            parts += (b"$%d\r\n" % len(value), value, b"\r\n")
            start = i + 1
        if start < len(args):
            parts.append(_bulk_strings(args[start:]))
    return parts


def pack_set_nx_get(keys: Sequence[str], values: Sequence[bytes], ttl_s: int) -> list[bytes]:
    """`SET key value NX GET EX ttl_s` for each pair, packed as `pack` would pack them: the
    writer's one command per job, formatted in one step each (`pack` takes ~3 µs a command
    of this shape, this ~0.5)."""
    ttl = str(ttl_s).encode()
    tail = b"\r\n$2\r\nNX\r\n$3\r\nGET\r\n$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ttl), ttl)
    parts: list[bytes] = []
    for key, value in zip(keys, values, strict=True):
        raw = key.encode()
        head = b"*7\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(raw), raw, len(value))
        parts += (head, value, tail)
    return parts


def _bulk_strings(args: tuple[Arg, ...]) -> bytes:
    """The arguments' bulk strings, without the array header `*<n>` hiredis puts first."""
    packed = _pack_command(args)
    return packed[packed.index(b"\n") + 1 :]


async def send_many(
    client: AsyncRedis, commands: Sequence[Command], *, packed: list[bytes] | None = None
) -> list[Any]:
    """Each command's reply, or its error reply as an exception object, in order.

    `packed`: the commands already packed (`pack_set_nx_get`), for one server; a cluster
    client sends `commands`. They must be the same commands: one reply is read for each of
    `commands`, and a connection left with replies unread is never reused (it is dropped on
    any error). A lost connection raises `redis.ConnectionError`, a reply that does not come
    within the socket timeout `redis.TimeoutError`."""
    if not commands:
        return []
    if isinstance(client, AsyncRedisCluster):
        return await _cluster_pipeline(client, commands)
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(pack(commands) if packed is None else packed)
        # The parser, not conn.read_response: that one opens a timeout context per reply,
        # which cost more than the parse itself. One timeout bounds the whole batch.
        parser: Any = conn._parser
        async with asyncio.timeout(conn.socket_timeout):
            return [await parser.read_response() for _ in commands]
    except BaseException as exc:
        # Replies may still be on the socket: the next borrower must not read them.
        await conn.disconnect(nowait=True)
        # As redis-py raises them, so that callers catch one family (RedisError).
        if isinstance(exc, TimeoutError):
            raise redis.TimeoutError(f"no reply from Redis within {conn.socket_timeout}s") from exc
        if isinstance(exc, OSError):
            raise redis.ConnectionError(f"lost the connection to Redis: {exc!r}") from exc
        raise
    finally:
        await pool.release(conn)


async def _cluster_pipeline(client: AsyncRedisCluster, commands: Sequence[Command]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for command in commands:
            # redis-py parses some replies by command name; `get=True` is what keeps its SET
            # parser from turning `SET … GET`'s reply into a bool (the rest used here it
            # leaves as they are: EVALSHA, MGET, XACK).
            options = {"get": True} if str(command[0]).upper() == "SET" else {}
            pipe.execute_command(*command, **options)
        return list(await pipe.execute(raise_on_error=False))


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One call of a registered script, for `run_scripts`."""

    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Arg]


async def run_scripts(client: AsyncRedis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Runs script calls as EVALSHA in one `send_many`; each call's reply, or its error.

    Calls answered NOSCRIPT (a Redis restarted empty, a node that never saw the script) run
    again once the script is loaded (on every primary of a cluster); a node's calls fail
    together, so the reruns keep their relative order."""
    replies = await send_many(client, [_evalsha(call) for call in calls])
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {calls[i].script.script for i in missing}:
            await client.script_load(script)
        again = await send_many(client, [_evalsha(calls[i]) for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


def _evalsha(call: ScriptCall) -> list[Arg]:
    return ["EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args]
