"""`wire.send_many` and `wire.run_scripts` against a real redis-server, attacked where a batch
sent in one write could go wrong: error replies in the middle, a cancel or a lost connection
half-way through the replies (the next caller must never read the last one's replies), and
scripts that Redis forgot."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from sluice.queue import connect
from sluice.wire import ScriptCall, run_scripts, send_many

pytestmark = pytest.mark.integration

#: Keeps Redis busy for 0.3 s (DEBUG SLEEP is disabled on a default redis-server).
SPIN_300_MS = """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + 300000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return 1
"""


def test_replies_come_back_in_order_with_errors_as_objects(redis_url: str, model_name: str) -> None:
    async def go() -> list[Any]:
        client = connect(redis_url)
        try:
            await client.lpush(f"{model_name}:list", "x")
            return await send_many(
                client,
                [
                    ("SET", f"{model_name}:a", b"1", "NX", "GET"),
                    ("GET", f"{model_name}:list"),  # WRONGTYPE, mid-batch
                    ("SET", f"{model_name}:a", b"2", "NX", "GET"),
                    ("INCRBY", f"{model_name}:n", 5),
                    ("NOSUCHCOMMAND",),
                    ("MGET", f"{model_name}:a", f"{model_name}:none"),
                ],
            )
        finally:
            await client.aclose()

    first, wrong, second, n, unknown, both = asyncio.run(go())
    assert first is None and second == b"1" and n == 5 and both == [b"1", None]
    assert isinstance(wrong, ResponseError) and "WRONGTYPE" in str(wrong)
    assert isinstance(unknown, ResponseError)


def test_a_refused_command_is_its_own_error(worker_url: str, model_name: str) -> None:
    async def go() -> list[Any]:
        client = connect(worker_url)
        try:
            return await send_many(client, [("FLUSHALL",), ("PING",)])
        finally:
            await client.aclose()

    refused, pong = asyncio.run(go())
    assert isinstance(refused, NoPermissionError) and pong == b"PONG"


def test_a_cancel_mid_batch_never_hands_its_replies_to_the_next_caller(
    redis_url: str, model_name: str
) -> None:
    """A batch whose reads are cancelled half-way leaves replies on the socket: the connection
    must be dropped, or the next batch on the pool would read them as its own."""

    async def go() -> None:
        client = connect(redis_url, max_connections=1)  # one connection: it would be reused
        try:
            slow = [("EVAL", SPIN_300_MS, 0), *[("ECHO", f"stale-{i}") for i in range(50)]]
            task = asyncio.create_task(send_many(client, slow))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for round_ in range(20):
                echoes = [("ECHO", f"fresh-{round_}-{i}") for i in range(5)]
                replies = await send_many(client, echoes)
                assert replies == [f"fresh-{round_}-{i}".encode() for i in range(5)]
        finally:
            await client.aclose()

    asyncio.run(go())


def test_a_killed_connection_raises_and_the_next_batch_reconnects(
    redis_url: str, r: redis.Redis, model_name: str
) -> None:
    async def go() -> None:
        client = connect(redis_url, max_connections=1)
        try:
            await client.client_setname(f"{model_name}-victim")
            ([my_id],) = [await send_many(client, [("CLIENT", "ID")])]
            r.client_kill_filter(_id=my_id)
            with pytest.raises(redis.ConnectionError):
                await send_many(client, [("PING",)])
            assert await send_many(client, [("ECHO", "after")]) == [b"after"]
        finally:
            await client.aclose()

    asyncio.run(go())


def test_scripts_forgotten_by_redis_are_loaded_and_rerun_in_order(
    redis_url: str, r: redis.Redis, model_name: str
) -> None:
    async def go() -> list[Any]:
        client = connect(redis_url)
        try:
            append = client.register_script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
            echo = client.register_script("return ARGV[1]")
            r.script_flush()
            key = f"{model_name}:order"
            calls = [ScriptCall(append, [key], [i]) for i in range(5)]
            calls.insert(2, ScriptCall(echo, [], ["middle"]))
            return await run_scripts(client, calls)
        finally:
            await client.aclose()

    replies = asyncio.run(go())
    assert replies == [1, 2, b"middle", 3, 4, 5]
    assert r.lrange(f"{model_name}:order", 0, -1) == [b"0", b"1", b"2", b"3", b"4"]


def test_a_reset_connection_is_a_redis_connection_error(redis_url: str, model_name: str) -> None:
    """A peer that resets the connection (RST, not FIN) reaches callers as redis-py's
    `ConnectionError`, the one family every loop of the replica retries."""

    async def go() -> None:
        server = await asyncio.start_server(reset_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = connect(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=2)
        try:
            with pytest.raises(redis.ConnectionError):
                await send_many(client, [("PING",)])
        finally:
            await client.aclose()
            server.close()

    asyncio.run(go())


def test_a_url_asking_for_str_replies_is_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        connect(f"{redis_url}?decode_responses=true")


async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
