"""Leases and reclaim: a live replica keeps what it holds however long a job runs; a replica
that stops renewing loses its entries to another; entries deleted while pending are recorded.

Findings 3 and 4 of issue 16: a 1.5 s job with a 0.5 s visibility timeout ran twice and was
dead-lettered (nothing renewed the entries a live replica held), and entries trimmed while
pending vanished without a result, a dead letter, a log line or a metric (XCLAIM drops them).
Real redis-server, real (tiny) models, workers driven bare, two of them on one model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sluice.protocol import GROUP, dead_key, jobs_key, result_key
from sluice.queue import StreamQueue, connect
from sluice.runners.base import Progress
from sluice.runners.embed import EmbedRunner
from sluice.runners.generate import GenerateRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.worker import Worker
from tests.integration.test_semantics import all_stored, until

pytestmark = pytest.mark.integration

VISIBILITY_S = 0.3


class SlowGenerator(GenerateRunner):
    """The real generation runner whose first step takes `first_step_s` (a long prefill)."""

    first_step_s = 0.0

    def step(self) -> list[Progress]:
        if self.first_step_s:
            time.sleep(self.first_step_s)
            self.first_step_s = 0.0
        return super().step()


async def start(url: str, consumer: str, runner: Any, queue: dict[str, Any]) -> Worker:
    limits = QueueSettings(block_ms=100, **queue)
    settings = runner.settings
    queue_ = StreamQueue(connect(url), settings.name, consumer, limits)
    worker = Worker(queue_, runner, settings, limits)
    worker.start()
    await asyncio.wait_for(worker.ready.wait(), 15)
    return worker


def test_a_generation_job_running_ten_visibility_timeouts_is_answered_once_ok(
    redis_url, worker_url, model_name, tiny_generator
):
    async def scenario() -> None:
        r = connect(redis_url)
        settings = ModelSettings(
            name=model_name,
            model_path=tiny_generator,
            task="generate",
            torch_threads=1,
            dtype="fp32",
            max_batch_size=4,
            max_new_tokens=8,
        )
        holder, other = SlowGenerator(settings), SlowGenerator(settings)
        holder.load()
        other.load()
        holder.first_step_s = 10 * VISIBILITY_S + 0.5
        queue = {
            "visibility_timeout_s": VISIBILITY_S,
            "reclaim_interval_s": 0.05,
            "max_deliveries": 2,
        }
        first = await start(worker_url, "holder", holder, queue)
        await r.xadd(jobs_key(model_name), {"id": "long", "input": '{"prompt": "a stream of"}'})
        await until(lambda: _true(first.queue.held == 1), what="the holder to pull it")
        # A second replica, reclaiming every 50 ms, all the while the job runs.
        second = await start(worker_url, "other", other, queue)
        (res,) = await all_stored(r, model_name, ["long"], timeout_s=60)
        assert res["status"] == "ok", res
        assert res["timings"]["total_ms"] >= 10 * VISIBILITY_S * 1000
        await first.stop(10)
        await second.stop(10)
        assert second.stats.reclaimed == 0 and first.stats.reclaimed == 0
        assert first.stats.leases_lost == 0 and first.stats.leases_renewed >= 10
        assert first.stats.duplicates == 0 and first.stats.dead_letters == 0
        assert await r.xlen(dead_key(model_name)) == 0
        (row,) = await r.xpending_range(jobs_key(model_name), GROUP, "-", "+", 10) or [None]
        assert row is None  # acked
        await r.aclose()

    asyncio.run(scenario())


def test_a_replica_that_stops_renewing_loses_its_entries_to_a_live_one(
    redis_url, worker_url, model_name, tiny_bert
):
    """The other side of the lease: a frozen replica (renewals off: what SIGSTOP does) holds
    entries; a live replica reclaims and answers them once."""

    async def scenario() -> None:
        r = connect(redis_url)
        settings = ModelSettings(
            name=model_name, model_path=tiny_bert, torch_threads=1, dtype="fp32"
        )
        lane = jobs_key(model_name)
        await r.xgroup_create(lane, GROUP, id="0", mkstream=True)
        ids = [f"f{i}" for i in range(10)]
        for i in ids:
            await r.xadd(lane, {"id": i, "input": '{"text": "held by a frozen replica"}'})
        frozen = StreamQueue(connect(worker_url), model_name, "frozen", QueueSettings())
        await frozen.ensure_group()
        assert len(await frozen.pull(100, None)) == 10
        runner = EmbedRunner(settings)
        runner.load()
        queue = {"visibility_timeout_s": VISIBILITY_S, "reclaim_interval_s": 0.05}
        live = await start(worker_url, "live", runner, queue)
        results = await all_stored(r, model_name, ids)
        assert {x["status"] for x in results} == {"ok"}
        await live.stop(10)
        assert live.stats.reclaimed == 10
        # The frozen one wakes up: its renewal finds every entry gone, and takes none back.
        renewed = await frozen.renew()
        assert renewed.renewed == 0 and frozen.held == 0
        await frozen.redis.aclose()
        await r.aclose()

    asyncio.run(scenario())


def test_entries_deleted_while_pending_are_dead_lettered_not_lost(
    redis_url, worker_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        lane = jobs_key(model_name)
        await r.xgroup_create(lane, GROUP, id="0", mkstream=True)
        for i in range(3):
            await r.xadd(lane, {"id": f"gone{i}", "input": '{"text": "a"}'})
        # A replica pulled them and died; then a producer trimmed the lane (XADD ... MAXLEN 1,
        # which the producer's rights allowed before issue 16): the 3 pending entries go.
        await r.xreadgroup(GROUP, "ghost", {lane: ">"}, count=10)
        await r.xadd(lane, {"id": "last", "input": '{"text": "b"}'}, maxlen=1, approximate=False)
        entry_ids = [
            p["message_id"].decode() for p in await r.xpending_range(lane, GROUP, "-", "+", 10)
        ]
        settings = ModelSettings(
            name=model_name, model_path=tiny_bert, torch_threads=1, dtype="fp32"
        )
        runner = EmbedRunner(settings)
        runner.load()
        queue = {"visibility_timeout_s": VISIBILITY_S, "reclaim_interval_s": 0.05}
        worker = await start(worker_url, "live", runner, queue)
        (last,) = await all_stored(r, model_name, ["last"])
        assert last["status"] == "ok"
        await until(lambda: _true(worker.stats.deleted_while_pending == 3), what="3 recorded")
        await worker.stop(10)
        letters = await r.xrange(dead_key(model_name))
        assert sorted(f[b"entry_id"].decode() for _, f in letters) == sorted(entry_ids)
        assert {f[b"reason"] for _, f in letters} == {b"deleted_while_pending"}
        assert {f[b"lane"] for _, f in letters} == {b"normal"}
        assert (await r.xpending(lane, GROUP))["pending"] == 0
        # Recorded once: later reclaim passes find nothing more.
        assert worker.stats.deleted_while_pending == 3
        assert await r.get(result_key(model_name, "gone0")) is None  # no id known: no result
        await r.aclose()

    asyncio.run(scenario())


def test_reclaim_costs_the_same_however_long_the_pending_list(redis_url, model_name):
    """XAUTOCLAIM scans at most 10 x count entries from a cursor: with 20,000 entries pending
    on a live consumer (none stale), one reclaim pass stays fast and claims nothing."""

    async def scenario() -> None:
        r = connect(redis_url)
        lane = jobs_key(model_name)
        await r.xgroup_create(lane, GROUP, id="0", mkstream=True)
        for start_at in range(0, 20_000, 2_000):
            async with r.pipeline(transaction=False) as pipe:
                for i in range(start_at, start_at + 2_000):
                    pipe.xadd(lane, {"id": f"p{i}", "input": "{}"})
                await pipe.execute()
        await r.xreadgroup(GROUP, "busy", {lane: ">"}, count=20_000)
        q = StreamQueue(r, model_name, "reclaimer", QueueSettings(visibility_timeout_s=3600))
        await r.config_set("slowlog-log-slower-than", 2_000)
        await r.slowlog_reset()
        try:
            for _ in range(20):
                found = await q.reclaim(64)
                assert found.entries == [] and found.deleted == []
            slow = [
                row
                for row in await r.slowlog_get(128)
                if model_name.encode()
                in b" ".join(a if isinstance(a, bytes) else str(a).encode() for a in row["command"])
            ]
            assert slow == []
        finally:
            await r.config_set("slowlog-log-slower-than", 10_000)
        await r.aclose()

    asyncio.run(scenario())


async def _true(value: bool) -> bool:
    return value
