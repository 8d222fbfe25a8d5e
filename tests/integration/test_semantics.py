"""Job semantics, end to end on a real redis-server and a real (tiny) model, worker driven bare:
priority lanes, deadlines, cancellation, bounded admission, idempotent submit, retries and dead
letters, trimming, push replies, `truncate=false`. docs/semantics.md points at each test here.

The runner is the real embedding runner with a probe: it counts forward passes, notes which
held a marker word, can be held at a gate, and can be told to fail the marker's runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from sluice import AsyncClient, InputTooLarge, JobExpired, Overloaded, UnknownModel
from sluice.errors import JobCancelled
from sluice.protocol import GROUP, dead_key, encode_job_fields, jobs_key, result_key
from sluice.queue import StreamQueue, connect
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.worker import Worker

pytestmark = pytest.mark.integration

MARK = "zebra"


class ProbeRunner(EmbedRunner):
    """The real runner, watched (see the module docstring). Its state is set before start."""

    def load(self) -> None:
        super().load()
        self.calls = 0
        self.marked: list[int] = []  # the forward passes (1-based) whose batch held MARK
        self.gate = threading.Event()
        self.gate.set()
        self.failures: list[BaseException] = []  # raised by MARK's next runs, in order
        self.delay_s = 0.0  # added to each forward pass: a model slower than its pipeline
        self.mark_id = self.tokenizer(MARK, add_special_tokens=False)["input_ids"][0]

    def run(self, prepared: Any) -> Any:
        if not self.gate.wait(60):
            raise RuntimeError("the test never opened the gate")
        self.calls += 1
        time.sleep(self.delay_s)
        if any(self.mark_id in row for row in prepared["input_ids"].tolist()):
            self.marked.append(self.calls)
            if self.failures:
                raise self.failures.pop(0)
        return super().run(prepared)


@asynccontextmanager
async def running_worker(
    url: str, model: str, path: str, *, queue: dict[str, Any] | None = None, **model_kw: Any
) -> AsyncIterator[tuple[Worker, ProbeRunner]]:
    model_kw = {"torch_threads": 1, "max_batch_size": 16, "dtype": "fp32", **model_kw}
    settings = ModelSettings(name=model, model_path=path, **model_kw)
    limits = QueueSettings(**{"block_ms": 100, **(queue or {})})
    runner = ProbeRunner(settings)
    runner.load()
    worker = Worker(StreamQueue(connect(url), model, "c1", limits), runner, settings, limits)
    worker.start()
    await asyncio.wait_for(worker.ready.wait(), 15)
    try:
        yield worker, runner
    finally:
        runner.gate.set()
        await worker.stop(10)


async def until(condition: Any, timeout_s: float = 30, what: str = "condition") -> Any:
    async with asyncio.timeout(timeout_s):
        while not (value := await condition()):
            await asyncio.sleep(0.02)
        return value


async def stored(r: Any, model: str, ids: Sequence[str]) -> list[dict[str, Any] | None]:
    raw = await r.mget([result_key(model, i) for i in ids])
    return [None if v is None else orjson.loads(v) for v in raw]


async def all_stored(r: Any, model: str, ids: Sequence[str], timeout_s: float = 30) -> list[Any]:
    async def done() -> list[Any] | None:
        values = await stored(r, model, ids)
        return values if all(v is not None for v in values) else None

    return await until(done, timeout_s)  # type: ignore[no-any-return]


def test_a_high_job_overtakes_a_deep_normal_backlog(
    redis_url, worker_url, producer_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        async with (
            running_worker(worker_url, model_name, tiny_bert, queue={"max_queue_depth": 0}) as (
                worker,
                runner,
            ),
            AsyncClient(producer_url) as client,
        ):
            # A real model's batch takes longer than pulling and tokenizing one: so here too,
            # or the tiny model would race its own pipeline and the count would measure that.
            runner.delay_s = 0.02
            runner.gate.clear()  # the backlog builds up behind a held model
            await client.submit_many(model_name, [f"normal job {i}" for i in range(5000)])
            await until(lambda: _pending(r, model_name), what="the replica to pull")
            before = runner.calls
            runner.gate.set()
            await until(lambda: _async(runner.calls > before + 3), what="the drain to start")
            high = await client.submit(model_name, f"{MARK} urgent", priority="high")
            # Counted once the submit returned, so the job is in its lane: batches started
            # during the submit's own round trip (a loaded box) do not count against it.
            at_submit = runner.calls
            (res,) = await client.wait([high], timeout=30)
            assert res.ok
            # Answered within two batches: one batch was running when the high job came; the
            # pull loop waits for room in the run queue (a normal batch in hand), gets room
            # when the next batch starts, pulls the high job first and queues it ahead of every
            # prefetched normal batch. So it runs second at the latest.
            (high_pass,) = runner.marked
            assert high_pass - at_submit <= 2, (high_pass, at_submit)
            left = await r.xlen(jobs_key(model_name)) - worker.stats.ok
            assert left > 1000, "the backlog was still deep when the high job was answered"
        await r.aclose()

    asyncio.run(scenario())


def test_a_job_past_its_deadline_is_never_run(
    redis_url, worker_url, producer_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        async with running_worker(worker_url, model_name, tiny_bert):
            pass  # registers the model; then no replica runs for a while
        async with AsyncClient(producer_url) as client:
            # 1. Expired while queued: answered `expired` at pull, never batched.
            late = await client.submit(model_name, f"{MARK} too late", deadline_s=0.2)
            await asyncio.sleep(0.3)
            async with running_worker(worker_url, model_name, tiny_bert, max_batch_size=1) as (
                worker,
                runner,
            ):
                (res,) = await client.wait([late], timeout=30)
                assert res.status == "expired"
                await until(lambda: _async(worker.stats.expired == 1), what="counted expired")
                with pytest.raises(JobExpired):
                    await client.result(late)

                # 2. Alive when pulled, expired waiting for the model: dropped before it runs.
                runner.gate.clear()
                hold = await client.submit(model_name, "hold the model")
                queued = await client.submit(model_name, f"{MARK} queued", deadline_s=1.0)
                await until(lambda: _pending_at_least(r, model_name, 2), what="both pulled")
                await asyncio.sleep(1.1)
                runner.gate.set()
                results = await client.wait([hold, queued], timeout=30)
                assert [x.status for x in results] == ["ok", "expired"]
                assert runner.marked == [], "an expired job reached the model"
                assert await _group_pending(r, model_name) == 0
        await r.aclose()

    asyncio.run(scenario())


def test_cancel_a_queued_job(redis_url, worker_url, producer_url, model_name, tiny_bert):
    async def scenario() -> None:
        r = connect(redis_url)
        async with (
            running_worker(worker_url, model_name, tiny_bert, max_batch_size=1) as (w, runner),
            AsyncClient(producer_url) as client,
        ):
            runner.gate.clear()
            hold = await client.submit(model_name, "hold the model")
            doomed = await client.submit(model_name, f"{MARK} never run")
            final = await client.cancel(doomed)
            assert final.status == "cancelled" and final.error["code"] == "cancelled"
            runner.gate.set()
            results = await client.wait([hold, doomed], timeout=30)
            assert [x.status for x in results] == ["ok", "cancelled"]
            with pytest.raises(JobCancelled):
                await client.result(doomed)
            await until(lambda: _async(w.stats.skipped == 1), what="the entry acked unrun")
            assert runner.marked == []
            assert await _group_pending(r, model_name) == 0
            # Cancel is not an undo: a job with a result keeps it.
            assert (await client.cancel(hold)).status == "ok"
            # A second cancel answers the same cancelled result.
            assert (await client.cancel(doomed)).status == "cancelled"
        await r.aclose()

    asyncio.run(scenario())


def test_admission_bounds_the_queue_and_knows_the_models(
    redis_url, worker_url, producer_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        async with (
            running_worker(
                worker_url, model_name, tiny_bert, queue={"max_queue_depth": 20}, max_batch_size=4
            ) as (_, runner),
            AsyncClient(producer_url) as client,
        ):
            runner.gate.clear()
            with pytest.raises(Overloaded) as full:
                await client.submit_many(model_name, [f"job {i}" for i in range(50)])
            err = full.value
            assert err.code == "rejected" and err.retryable
            assert len(err.accepted) == 20 and len(err.rejected) == 30
            assert "20" in err.message
            # A rejected job left no trace: no entry, no result.
            assert await _entries(r, model_name) == 20
            assert await stored(r, model_name, err.rejected[:3]) == [None] * 3
            runner.gate.set()
            results = await client.wait(err.accepted, timeout=30)
            assert {x.status for x in results} == {"ok"}
            # Room again once the replica caught up.
            await client.wait([await client.submit(model_name, "room again")], timeout=30)
            with pytest.raises(UnknownModel):
                await client.submit(f"never-served-{model_name}", "anyone there?")
        await r.aclose()

    asyncio.run(scenario())


def test_the_same_id_twice_is_one_job_and_one_result(
    redis_url, worker_url, producer_url, model_name, tiny_bert
):
    async def scenario() -> None:
        r = connect(redis_url)
        async with (
            running_worker(worker_url, model_name, tiny_bert) as (worker, runner),
            AsyncClient(producer_url) as first,
            AsyncClient(producer_url) as second,
        ):
            # Through the SDK: the second submit is a no-op and both clients get the result.
            runner.gate.clear()
            await first.submit(model_name, f"{MARK} once", id="same-id")
            await second.submit(model_name, "different text, same id", id="same-id")
            assert await _entries(r, model_name) == 1
            runner.gate.set()
            (a,) = await first.wait(["same-id"], timeout=30)
            (b,) = await second.wait(["same-id"], timeout=30, model=model_name)
            assert a.ok and a.to_json() == b.to_json()
            # After the result: a resubmit is answered at once from the stored result.
            await second.submit(model_name, "again", id="same-id")
            assert await _entries(r, model_name) == 1
            assert runner.marked == [1]

            # Raw producers bypass the dedupe: two entries with one id run at most... and are
            # answered once: one stored result, pushed to both reply streams.
            runner.gate.clear()
            fields = encode_job_fields(
                "raw-dup", {"text": "raw"}, reply_to=f"sluice:reply:a-{model_name}"
            )
            await r.xadd(jobs_key(model_name), dict(fields))
            fields = encode_job_fields(
                "raw-dup", {"text": "raw 2"}, reply_to=f"sluice:reply:b-{model_name}"
            )
            await r.xadd(jobs_key(model_name), dict(fields))
            runner.gate.set()
            await all_stored(r, model_name, ["raw-dup"])
            for stream in (f"sluice:reply:a-{model_name}", f"sluice:reply:b-{model_name}"):
                replies = await until(lambda s=stream: r.xrange(s), what=f"a push to {stream}")
                assert len(replies) == 1
            (one,) = await stored(r, model_name, ["raw-dup"])
            pushed = {
                (await r.xrange(s))[0][1][b"result"]
                for s in (f"sluice:reply:a-{model_name}", f"sluice:reply:b-{model_name}")
            }
            assert pushed == {orjson.dumps(one)} or len(pushed) == 1
            assert await _group_pending(r, model_name) == 0
            assert worker.stats.ok + worker.stats.skipped >= 3
        await r.aclose()

    asyncio.run(scenario())


def test_retryable_failures_are_retried_then_dead_lettered(
    redis_url, worker_url, producer_url, model_name, tiny_bert
):
    queue = {"max_deliveries": 3, "retry_backoff_s": 0.05}

    async def scenario() -> None:
        r = connect(redis_url)
        async with (
            running_worker(worker_url, model_name, tiny_bert, queue=queue) as (worker, runner),
            AsyncClient(producer_url) as client,
        ):
            # Out of memory twice, then fine: ok on the third run.
            runner.failures = [MemoryError("fake OOM"), MemoryError("fake OOM")]
            flaky = await client.submit(model_name, f"{MARK} flaky")
            (res,) = await client.wait([flaky], timeout=30)
            assert res.ok and len(runner.marked) == 3 and worker.stats.retries == 2

            # Out of memory every time: dead-lettered after max_deliveries runs, with why.
            runner.marked.clear()
            runner.failures = [MemoryError("fake OOM")] * 3
            doomed = await client.submit(model_name, f"{MARK} doomed")
            (res,) = await client.wait([doomed], timeout=30)
            assert res.status == "error" and res.error["code"] == "dead_lettered"
            assert "resource_exhausted" in res.error["message"]
            assert len(runner.marked) == 3
            (letter,) = await r.xrange(dead_key(model_name))
            reason = letter[1][b"reason"].decode()
            assert letter[1][b"id"].decode() == doomed
            assert "resource_exhausted" in reason and "failed 3 times" in reason

            # A model bug is not retried: model_failure at once.
            runner.marked.clear()
            runner.failures = [ValueError("a bug")]
            bug = await client.submit(model_name, f"{MARK} bug")
            (res,) = await client.wait([bug], timeout=30)
            assert res.error["code"] == "model_failure"
            assert len(runner.marked) == 1 and worker.stats.retries == 4
            assert await _group_pending(r, model_name) == 0

            # The CLI sees the dead letter and replays it; this time it runs fine.
            out = _cli(redis_url, "dlq", "list", model_name, "--json")
            (row,) = json.loads(out)
            assert row["id"] == doomed and "resource_exhausted" in row["reason"]
            shown = json.loads(_cli(redis_url, "dlq", "show", model_name, row["dead_id"]))
            assert shown["id"] == doomed and shown["dead_id"] == row["dead_id"]
            assert "replayed" in _cli(redis_url, "dlq", "replay", model_name, row["dead_id"])
            (res,) = await client.wait([doomed], timeout=30)
            assert res.ok
            assert await r.xlen(dead_key(model_name)) == 0
        await r.aclose()

    asyncio.run(scenario())


def test_dlq_purge(redis_url, worker_url, model_name, tiny_bert):
    async def scenario() -> None:
        r = connect(redis_url)
        async with running_worker(worker_url, model_name, tiny_bert):
            for i in range(3):  # no usable id: dead-lettered by entry id only
                await r.xadd(jobs_key(model_name), {"input": '{"text": "no id"}', "n": str(i)})
            await until(lambda: _dead(r, model_name, 3), what="three dead letters")
        await r.aclose()

    asyncio.run(scenario())
    ids = [
        row["dead_id"] for row in json.loads(_cli(redis_url, "dlq", "list", model_name, "--json"))
    ]
    assert len(ids) == 3
    assert "no usable id" in _cli(redis_url, "dlq", "replay", model_name, ids[0], check=False)
    assert "1" in _cli(redis_url, "dlq", "purge", model_name, ids[0])
    refused = _cli(redis_url, "dlq", "purge", model_name, "--all", check=False)
    assert "--yes" in refused
    assert "2" in _cli(redis_url, "dlq", "purge", model_name, "--all", "--yes")
    assert json.loads(_cli(redis_url, "dlq", "list", model_name, "--json")) == []


def test_trimming_never_drops_an_unacked_entry(redis_url, worker_url, model_name, tiny_bert):
    async def scenario() -> None:
        r = connect(redis_url)
        lane = jobs_key(model_name)
        limits = QueueSettings()
        queue = StreamQueue(connect(worker_url), model_name, "trimmer", limits)
        await queue.ensure_group()
        ids = [await r.xadd(lane, {"id": f"t{i}", "input": "{}"}) for i in range(20)]
        delivered = await r.xreadgroup(GROUP, "c", {lane: ">"}, count=10)
        got = [eid for eid, _ in delivered[0][1]]
        assert got == ids[:10]
        await r.xack(lane, GROUP, *got[:4], *got[6:8])  # 4 and 5 stay pending
        assert await queue.trim() == 4  # only what lies below the oldest pending entry
        remaining = [eid for eid, _ in await r.xrange(lane)]
        assert remaining == ids[4:]
        await r.xack(lane, GROUP, *got)
        # All delivered are acked: trimmed up to the last delivered one, which stays (MINID
        # keeps its bound, and XINFO's lag stays exact); nothing undelivered goes.
        assert await queue.trim() == 5
        assert [eid for eid, _ in await r.xrange(lane)] == ids[9:]
        assert await queue.trim() == 0
        await queue.redis.aclose()

        # The worker trims on its own as it goes.
        texts = [{"text": f"t {i}"} for i in range(40)]
        trim = {"trim_interval_s": 0.1}
        async with running_worker(worker_url, model_name, tiny_bert, queue=trim) as (worker, _):
            job_ids = [f"w{i}" for i in range(40)]
            for job_id, text in zip(job_ids, texts, strict=True):
                await r.xadd(lane, dict(encode_job_fields(job_id, text)))
            await all_stored(r, model_name, job_ids)
            await until(lambda: _async(worker.stats.trimmed >= 39), what="the worker to trim")
        await r.aclose()

    asyncio.run(scenario())


def test_push_replies_reach_wait_and_a_redis_cli_producer(
    worker_url, producer_url, redis_cli, model_name, tiny_bert
):
    async def scenario() -> None:
        async with (
            running_worker(worker_url, model_name, tiny_bert),
            AsyncClient(producer_url) as client,
        ):
            ids = await client.submit_many(model_name, [f"wait {i}" for i in range(100)])
            results = await client.wait(ids, timeout=30)
            assert [x.id for x in results] == ids and {x.status for x in results} == {"ok"}

            # Another language: a plain XADD with reply_to, then a blocking XREAD.
            reply = f"sluice:reply:cli-{model_name}"
            base = [redis_cli, "-u", producer_url]
            subprocess.run(
                [
                    *base,
                    "XADD",
                    jobs_key(model_name),
                    "*",
                    "id",
                    "cli-1",
                    "input",
                    '{"text": "from redis-cli"}',
                    "reply_to",
                    reply,
                ],
                check=True,
                capture_output=True,
            )
            out = await asyncio.to_thread(
                subprocess.run,
                [*base, "--no-raw", "XREAD", "BLOCK", "20000", "STREAMS", reply, "0"],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert '\\"id\\":\\"cli-1\\"' in out.stdout and '\\"status\\":\\"ok\\"' in out.stdout

    asyncio.run(scenario())


def test_truncate_false_refuses_long_inputs(worker_url, producer_url, model_name, tiny_bert):
    async def scenario() -> None:
        async with (
            running_worker(worker_url, model_name, tiny_bert, max_length=8, truncate=False),
            AsyncClient(producer_url) as client,
        ):
            short = await client.submit(model_name, "short one")
            long = await client.submit(model_name, "far too many words " * 10)
            ok, refused = await client.wait([short, long], timeout=30)
            assert ok.ok and refused.error["code"] == "input_too_large"
            with pytest.raises(InputTooLarge, match="8"):
                await client.result(long)

    asyncio.run(scenario())


# -- small helpers ----------------------------------------------------------------------------


async def _async(value: Any) -> Any:
    return value


async def _pending(r: Any, model: str) -> bool:
    return await _group_pending(r, model) > 0


async def _pending_at_least(r: Any, model: str, n: int) -> bool:
    return await _group_pending(r, model) >= n


async def _group_pending(r: Any, model: str) -> int:
    groups = await r.xinfo_groups(jobs_key(model))
    return sum(int(g["pending"]) for g in groups if g["name"] == GROUP.encode())


async def _entries(r: Any, model: str) -> int:
    return int(await r.xlen(jobs_key(model)))


async def _dead(r: Any, model: str, n: int) -> bool:
    return int(await r.xlen(dead_key(model))) >= n


def _cli(url: str, *args: str, check: bool = True) -> str:
    env = {**os.environ, "SLUICE_REDIS_URL": url}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "sluice"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sluice {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout + proc.stderr
