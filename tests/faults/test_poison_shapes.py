"""Entries of absurd shapes: answered or dead-lettered at once, at bounded cost, and they
never stop trimming. The dead stream stays bounded in bytes, not only in entries.

Shapes a hostile or broken producer can XADD: thousands of fields, megabyte values, binary
names and values, repeated fields (`id` twice: which one?), empty names. Each is raw XADD, as
redis-cli would send it, with a valid job after it that must still run.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluice.protocol import GROUP, dead_key, jobs_key
from sluice.queue import DEAD_MAX_FIELDS, connect
from tests.integration.test_semantics import all_stored, running_worker, until

pytestmark = pytest.mark.integration

DEAD_ENTRY_MAX_BYTES = 4_096
MB = 1 << 20


def shapes() -> list[tuple[str | None, list[bytes]]]:
    """(the id it can be answered on, or None for a dead letter only; flat XADD field list)."""
    ok = b'{"text": "fine"}'
    many = [x for i in range(5_000) for x in (f"f{i}".encode(), b"v")]
    return [
        ("many-fields", [b"id", b"many-fields", b"input", ok, *many]),
        ("huge-input", [b"id", b"huge-input", b"input", b'{"text": "' + b"x" * MB + b'"}']),
        ("huge-name", [b"id", b"huge-name", b"input", ok, b"n" * MB, b"v"]),
        ("binary", [b"id", b"binary", b"input", b"\xff\x00\xfe", b"\x00\xff", b"\x80"]),
        ("repeated-input", [b"id", b"repeated-input", b"input", ok, b"input", b"{}"]),
        (None, [b"id", b"twice-a", b"id", b"twice-b", b"input", ok]),
        (None, [b"", b"", b"input", ok]),
        (None, [b"\xff\xfe", b"\x00", *many[:200]]),
        (None, [b"x" * MB, b"y" * MB]),
    ]


def test_absurd_entries_are_answered_or_dead_lettered_at_once_and_bounded(
    redis_url, worker_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        lane = jobs_key(model_name)
        queue = {
            "dead_entry_max_bytes": DEAD_ENTRY_MAX_BYTES,
            "trim_interval_s": 0.1,
            "max_deliveries": 1,
        }
        async with running_worker(worker_url, model_name, tiny_bert, queue=queue) as (worker, _):
            cases = shapes()
            for _, flat in cases:
                await r.execute_command("XADD", lane, "*", *flat)
            await r.xadd(lane, {"id": "after", "input": '{"text": "still runs"}'})
            answered = [job_id for job_id, _ in cases if job_id is not None]
            results = await all_stored(r, model_name, [*answered, "after"])
            by_id = dict(zip([*answered, "after"], results, strict=True))
            assert by_id.pop("after")["status"] == "ok"
            # Fields the protocol does not name are ignored (forward compatibility), whatever
            # their number or size: those jobs run.
            assert by_id.pop("many-fields")["status"] == "ok"
            assert by_id.pop("huge-name")["status"] == "ok"
            assert {x["status"] for x in by_id.values()} == {"error"}, by_id
            assert by_id["huge-input"]["error"]["code"] == "input_too_large"
            assert "more than once" in by_id["repeated-input"]["error"]["message"]
            dead_count = sum(1 for job_id, _ in cases if job_id is None)
            await until(
                lambda: _at_least(r.xlen(dead_key(model_name)), dead_count), what="the dead letters"
            )
            # Nothing left pending, and trimming went on past every poison entry.
            await until(lambda: _pending(r, lane, 0), what="all acked")
            await until(lambda: _at_most(r.xlen(lane), 1), what="the lane trimmed")
            assert worker.stats.dead_letters == dead_count
        letters = await r.xrange(dead_key(model_name))
        for _, fields in letters:
            size = sum(len(k) + len(v) for k, v in fields.items())
            assert size <= DEAD_ENTRY_MAX_BYTES + 512, size  # + the fields Sluice adds
            assert len(fields) <= DEAD_MAX_FIELDS + 6
        assert sum(1 for _, f in letters if f.get(b"truncated") == b"1") >= 2
        memory = await r.memory_usage(dead_key(model_name))
        assert memory < len(letters) * (DEAD_ENTRY_MAX_BYTES + 4096), memory
        await r.aclose()

    asyncio.run(scenario())


async def _at_least(value: Any, want: int) -> bool:
    return bool(await value >= want)


async def _at_most(value: Any, want: int) -> bool:
    return bool(await value <= want)


async def _pending(r: Any, lane: str, want: int) -> bool:
    return bool((await r.xpending(lane, GROUP))["pending"] == want)
