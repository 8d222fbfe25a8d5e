"""The write path under attack: bounded cost, replies after retried writes, one final outcome.

Each test is named for the behaviour it proves, and most reproduce a finding of issue 16 that
broke the code before: a retried write that scanned a busy reply stream (Redis stalled, the
replica wedged), answered ids that cost a full scan each, pushes lost when a write was
retried, and jobs that ended twice (cancelled and dead-lettered). Real redis-server, real
(tiny) model, the worker driven bare.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from sluice.protocol import GROUP, dead_key, jobs_key, reply_key, result_key
from sluice.queue import DeadLetter, Outcome, StreamQueue, connect
from sluice.settings import QueueSettings
from tests.integration.test_semantics import MARK, all_stored, running_worker, until

pytestmark = pytest.mark.integration

#: A Redis call on the job path that takes this long is a stall (SLOWLOG's unit is µs).
SLOW_US = 5_000


async def busy_reply_stream(r: Any, key: str, entries: int = 10_000) -> None:
    """A reply stream as a gateway's looks: thousands of recent results."""
    body = orjson.dumps({"id": "other", "status": "ok", "output": [0.1] * 32})
    for start in range(0, entries, 1000):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(entries, start + 1000)):
                pipe.xadd(key, {"id": f"other-{i}", "result": body})
            await pipe.execute()


async def slow_calls(r: Any, *needles: str) -> list[Any]:
    """SLOWLOG entries (over SLOW_US) whose arguments name any of `needles`."""
    rows = await r.slowlog_get(128)
    hits = []
    for row in rows:
        words = b" ".join(a if isinstance(a, bytes) else str(a).encode() for a in row["command"])
        if any(n.encode() in words for n in needles):
            hits.append(row)
    return hits


class slowlog:
    """Records every command slower than SLOW_US while the block runs."""

    def __init__(self, r: Any) -> None:
        self.r = r

    async def __aenter__(self) -> slowlog:
        self.before = await self.r.config_get("slowlog-log-slower-than")
        await self.r.config_set("slowlog-log-slower-than", SLOW_US)
        await self.r.slowlog_reset()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.r.config_set("slowlog-log-slower-than", self.before["slowlog-log-slower-than"])


async def pulled(
    url: str, model: str, entries: Sequence[dict[str, str]]
) -> tuple[Any, StreamQueue, list[Any]]:
    """A consumer `c1` on a fresh group that has pulled `entries` (XADDed first)."""
    r = connect(url)
    q = StreamQueue(r, model, "c1", QueueSettings())
    await q.ensure_group()
    async with r.pipeline(transaction=False) as pipe:
        for fields in entries:
            pipe.xadd(jobs_key(model), fields)
        await pipe.execute()
    got: list[Any] = []
    while len(got) < len(entries):
        got += await q.pull(1000, None)
    return r, q, got


def test_a_retried_write_of_a_batch_never_scans_a_busy_reply_stream(redis_url, model_name):
    async def scenario() -> None:
        reply = reply_key(f"gw-{model_name}")
        jobs = [{"id": f"j{i}", "input": '{"text": "a"}', "reply_to": reply} for i in range(64)]
        r, q, entries = await pulled(redis_url, model_name, jobs)
        await busy_reply_stream(r, reply)
        outcomes = [
            Outcome(e.entry_id, f"j{i}", orjson.dumps({"id": f"j{i}", "status": "ok"}), reply)
            for i, e in enumerate(entries)
        ]
        async with slowlog(r):
            # The first attempt stored and acked, and its reply was lost: then it is retried,
            # again and again (a flaky link): every attempt costs what the first did.
            for _ in range(5):
                assert await q.finish(outcomes) == [True] * 64
            assert await slow_calls(r, reply, model_name) == []
        pushed = await r.xrange(reply, min="-", max="+", count=20_000)
        ours = [f for _, f in pushed if f[b"id"].startswith(b"j")]
        assert len(ours) == 64 * 5  # at-least-once: every attempt pushed; readers drop repeats
        assert q.held == 0
        await r.aclose()

    asyncio.run(scenario())


def test_resubmitted_answered_ids_are_answered_from_the_result_at_bounded_cost(
    redis_url, worker_url, model_name, tiny_bert
):
    """Finding 2: 64 cancelled jobs naming a 10,000-entry reply stream stalled Redis 7.4 s."""

    async def scenario() -> None:
        r = connect(redis_url)
        reply = reply_key(model_name)
        await busy_reply_stream(r, reply)
        async with running_worker(worker_url, model_name, tiny_bert, max_batch_size=64) as (
            worker,
            runner,
        ):
            ids = [f"c{i}" for i in range(64)]
            cancelled = orjson.dumps({"id": "x", "status": "cancelled"})
            for i in ids:
                await r.set(result_key(model_name, i), cancelled)
            async with slowlog(r):
                async with r.pipeline(transaction=False) as pipe:
                    for i in ids:
                        pipe.xadd(
                            jobs_key(model_name),
                            {"id": i, "input": '{"text": "x"}', "reply_to": reply},
                        )
                    await pipe.execute()
                await until(lambda: _eq(worker.stats.skipped, 64), what="all skipped")
                assert await slow_calls(r, reply, model_name) == []
            assert runner.calls == 0  # none ran
            assert worker.stats.duplicates == 0  # answered before running: not duplicates
            pushed = await r.xrevrange(reply, count=64)
            assert sorted(f[b"id"].decode() for _, f in pushed) == sorted(ids)
            assert all(f[b"result"] == cancelled for _, f in pushed)
        await r.aclose()

    asyncio.run(scenario())


class FlakyPushQueue(StreamQueue):
    """Redis drops the connection right after each write's store, before its reply push and
    ack, the first time: the worker must retry the write and the push must still happen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed: set[str] = set()

    async def _push(self, owed: Sequence[tuple[str | None, str, bytes]]) -> None:
        fresh = [job_id for _, job_id, _ in owed if job_id not in self.failed]
        if fresh:
            self.failed.update(fresh)
            raise RedisConnectionError("injected: connection lost before the push")
        await super()._push(owed)


def test_every_final_outcome_reaches_reply_to_after_a_retried_write(
    redis_url, worker_url, model_name, tiny_bert
):
    """Finding 5: ok, error, expired, cancelled and dead letter, each written by a write whose
    first attempt lost its connection after storing and acking."""

    async def scenario() -> None:
        r = connect(redis_url)
        reply = reply_key(model_name)
        lane = jobs_key(model_name)
        async with running_worker(
            worker_url, model_name, tiny_bert, queue={"max_deliveries": 2}
        ) as (worker, _):
            flaky = FlakyPushQueue(worker.queue.redis, model_name, "c1", worker.queue.settings)
            worker.queue = flaky
            worker._collector._pull = flaky.pull  # the pull loop reads through it too
            await r.set(result_key(model_name, "cancelled"), orjson.dumps({"status": "cancelled"}))
            # An entry delivered too often already: dead-lettered when this replica reclaims it.
            await r.xadd(lane, {"id": "dead", "input": '{"text": "a"}', "reply_to": reply})
            jobs = {
                "ok": {"input": '{"text": "fine"}'},
                "error": {"input": '{"text": 42}'},
                "expired": {"input": '{"text": "late"}', "deadline_ms": "1"},
                "cancelled": {"input": '{"text": "never"}'},
            }
            for job_id, fields in jobs.items():
                await r.xadd(lane, {"id": job_id, **fields, "reply_to": reply})
            want = {"ok", "error", "expired", "cancelled"}

            async def answered() -> bool:
                got = {f[b"id"].decode() for _, f in await r.xrange(reply)}
                return want <= got

            await until(answered, what="every reply pushed")
            statuses = {
                f[b"id"].decode(): orjson.loads(f[b"result"])["status"]
                for _, f in await r.xrange(reply)
            }
            assert statuses == {
                "ok": "ok",
                "error": "error",
                "expired": "expired",
                "cancelled": "cancelled",
                "dead": "ok",
            }
            assert flaky.failed >= want
        await r.aclose()

    asyncio.run(scenario())


def test_a_dead_letter_retried_after_a_lost_push_still_pushes(redis_url, model_name):
    async def scenario() -> None:
        reply = reply_key(model_name)
        r, q, (entry,) = await pulled(
            redis_url, model_name, [{"id": "d1", "input": "{}", "reply_to": reply}]
        )
        result = orjson.dumps({"id": "d1", "status": "error", "error": {"code": "dead_lettered"}})
        outcome = Outcome(entry.entry_id, "d1", result, reply, "error")
        letter = DeadLetter(entry.entry_id, {"id": "d1"}, "too many", 4, outcome)
        assert await q.dead_letter([letter]) == 1
        # The first attempt's reply was lost after its push: the retry writes no second dead
        # letter, and pushes the stored result again.
        assert await q.dead_letter([letter]) == 0
        assert await r.xlen(dead_key(model_name)) == 1
        assert [f[b"result"] for _, f in await r.xrange(reply)] == [result, result]
        await r.aclose()

    asyncio.run(scenario())


def test_a_cancelled_job_that_is_over_delivered_ends_cancelled_not_dead_lettered(
    redis_url, worker_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        reply = reply_key(model_name)
        lane = jobs_key(model_name)
        await r.xgroup_create(lane, GROUP, id="0", mkstream=True)
        entry_id = await r.xadd(lane, {"id": "x1", "input": '{"text": "a"}', "reply_to": reply})
        # A replica pulled it and died, twice over; meanwhile the caller cancelled it.
        await r.xreadgroup(GROUP, "ghost", {lane: ">"}, count=1)
        await r.xclaim(lane, GROUP, "ghost", 0, [entry_id], retrycount=5, justid=True)
        await r.set(result_key(model_name, "x1"), orjson.dumps({"id": "x1", "status": "cancelled"}))
        queue = {"visibility_timeout_s": 0.2, "reclaim_interval_s": 0.1, "max_deliveries": 2}
        async with running_worker(worker_url, model_name, tiny_bert, queue=queue) as (w, _):
            await until(lambda: _pending_is(r, lane, 0), what="the entry acked")
            assert w.stats.dead_letters == 0
        assert await r.xlen(dead_key(model_name)) == 0
        (pushed,) = [orjson.loads(f[b"result"]) for _, f in await r.xrange(reply)]
        assert pushed["status"] == "cancelled"
        await r.aclose()

    asyncio.run(scenario())


def test_a_cancelled_job_whose_retries_run_out_ends_cancelled_not_dead_lettered(
    redis_url, model_name
):
    async def scenario() -> None:
        reply = reply_key(model_name)
        r, q, (entry,) = await pulled(
            redis_url, model_name, [{"id": "x2", "input": "{}", "reply_to": reply}]
        )
        cancelled = orjson.dumps({"id": "x2", "status": "cancelled"})
        await r.set(result_key(model_name, "x2"), cancelled)
        dead = orjson.dumps({"id": "x2", "status": "error", "error": {"code": "dead_lettered"}})
        letter = DeadLetter(
            entry.entry_id,
            {"id": "x2"},
            "failed 3 times",
            3,
            Outcome(entry.entry_id, "x2", dead, reply, "error"),
        )
        assert await q.dead_letter([letter]) == 0
        assert await r.xlen(dead_key(model_name)) == 0
        assert await r.get(result_key(model_name, "x2")) == cancelled
        assert [f[b"result"] for _, f in await r.xrange(reply)] == [cancelled]
        assert await r.xpending(jobs_key(model_name), GROUP) == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
        await r.aclose()

    asyncio.run(scenario())


def test_a_job_cancelled_while_running_ends_cancelled_once(
    redis_url, worker_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        reply = reply_key(model_name)
        async with running_worker(worker_url, model_name, tiny_bert) as (worker, runner):
            runner.gate.clear()  # the model holds the job while it is cancelled
            entered = threading.Event()
            run = runner.run

            def watched(prepared: Any) -> Any:
                entered.set()
                return run(prepared)

            runner.run = watched  # type: ignore[method-assign]
            await r.xadd(
                jobs_key(model_name), {"id": "run1", "input": '{"text": "a"}', "reply_to": reply}
            )
            await until(lambda: _eq(entered.is_set(), True), what="the job running")
            cancelled = orjson.dumps({"id": "run1", "status": "cancelled"})
            assert await r.set(result_key(model_name, "run1"), cancelled, nx=True)
            runner.gate.set()
            await until(lambda: _eq(worker.stats.duplicates, 1), what="the run to end")
        assert await r.get(result_key(model_name, "run1")) == cancelled
        assert [f[b"result"] for _, f in await r.xrange(reply)] == [cancelled]
        await r.aclose()

    asyncio.run(scenario())


def test_a_retried_job_whose_deadline_passes_in_the_backoff_ends_expired_once(
    redis_url, worker_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        reply = reply_key(model_name)
        queue = {"retry_backoff_s": 0.5, "max_deliveries": 3}
        async with running_worker(worker_url, model_name, tiny_bert, queue=queue) as (
            worker,
            runner,
        ):
            runner.failures = [MemoryError("injected: transient")]  # retryable
            deadline_ms = int(time.time() * 1000) + 300  # passes during the 0.4-0.5 s backoff
            await r.xadd(
                jobs_key(model_name),
                {
                    "id": "d1",
                    "input": orjson.dumps({"text": f"{MARK} a"}).decode(),
                    "deadline_ms": str(deadline_ms),
                    "reply_to": reply,
                },
            )
            (res,) = await all_stored(r, model_name, ["d1"])
            assert res["status"] == "expired"
            assert runner.marked and len(runner.marked) == 1  # ran once, never again
            await until(lambda: _eq(worker.queue.held, 0), what="the entry released")
        pushed = [orjson.loads(f[b"result"])["status"] for _, f in await r.xrange(reply)]
        assert pushed == ["expired"]
        assert await r.xlen(dead_key(model_name)) == 0
        await r.aclose()

    asyncio.run(scenario())


async def _eq(value: object, want: object) -> bool:
    return value == want


async def _pending_is(r: Any, lane: str, want: int) -> bool:
    info = await r.xpending(lane, GROUP)
    return bool(info["pending"] == want)


def test_a_result_key_of_another_type_dead_letters_its_job_and_spares_the_batch(
    redis_url, model_name
):
    """A producer XADDs to a future job's result key: that job can never be answered, but its
    batch-mates must be (stored, pushed, acked), and it must end as a dead letter."""

    async def scenario() -> None:
        reply = reply_key(model_name)
        jobs = [{"id": f"w{i}", "input": "{}", "reply_to": reply} for i in range(3)]
        r, q, entries = await pulled(redis_url, model_name, jobs)
        await r.xadd(result_key(model_name, "w1"), {"squat": "1"})
        outcomes = [
            Outcome(e.entry_id, f"w{i}", orjson.dumps({"id": f"w{i}", "status": "ok"}), reply)
            for i, e in enumerate(entries)
        ]
        assert await q.finish(outcomes) == [True, False, True]
        assert sorted(f[b"id"] for _, f in await r.xrange(reply)) == [b"w0", b"w2"]
        (letter,) = [f for _, f in await r.xrange(dead_key(model_name))]
        assert letter[b"id"] == b"w1" and b"another type" in letter[b"reason"]
        assert (await r.xpending(jobs_key(model_name), GROUP))["pending"] == 0
        assert q.held == 0
        await r.aclose()

    asyncio.run(scenario())


def test_an_entry_deleted_under_a_live_replica_is_answered_not_dead_lettered(redis_url, model_name):
    """The live holder of an entry deleted under it keeps pulling (it is alive) but cannot
    renew that entry: past the visibility timeout, a reclaimer must still leave it alone. Once
    the holder is silent too, the entry is recorded as deleted while pending."""

    async def scenario() -> None:
        reply = reply_key(model_name)
        r, holder, (entry,) = await pulled(
            redis_url, model_name, [{"id": "z1", "input": "{}", "reply_to": reply}]
        )
        await r.xadd(jobs_key(model_name), {"id": "z2", "input": "{}"})
        await r.xdel(jobs_key(model_name), entry.entry_id)  # an operator's XDEL, say
        other = StreamQueue(r, model_name, "other", QueueSettings(visibility_timeout_s=0.3))
        (z2,) = await other.pull(10, None)  # the reclaimer is a live consumer too
        for _ in range(8):  # 0.8 s: well past the timeout
            await holder.heartbeat()  # what a live replica's heartbeat loop does all along
            renewed = await holder.renew()
            assert renewed.deleted == [(entry.lane, entry.entry_id)]
            await holder.pull(10, None)  # what a live replica's pull loop does all along
            assert (await other.reclaim(64)).deleted == []
            await asyncio.sleep(0.1)
        result = orjson.dumps({"id": "z1", "status": "ok"})
        assert await holder.finish([Outcome(entry.entry_id, "z1", result, reply)]) == [True]
        assert await r.get(result_key(model_name, "z1")) == result
        assert await r.xlen(dead_key(model_name)) == 0
        # The other way: its holder silent past the timeout, a deleted entry is recorded.
        await r.xdel(jobs_key(model_name), z2.entry_id)
        await asyncio.sleep(0.4)
        fresh = StreamQueue(r, model_name, "fresh", QueueSettings(visibility_timeout_s=0.3))
        assert (await fresh.reclaim(64)).deleted == [(z2.lane, z2.entry_id)]
        (letter,) = [f for _, f in await r.xrange(dead_key(model_name))]
        assert (
            letter[b"reason"] == b"deleted_while_pending"
            and letter[b"consumer"].decode() == other.consumer
        )
        assert (await r.xpending(jobs_key(model_name), GROUP))["pending"] == 0
        await r.aclose()

    asyncio.run(scenario())
