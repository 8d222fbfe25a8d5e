"""The worker's pipeline driven bare (no Ray): health, poison batches, hostile reply_to."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from sluice.protocol import jobs_key, result_key
from sluice.queue import StreamQueue, connect
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.worker import Worker

pytestmark = pytest.mark.integration


class PoisonRunner(EmbedRunner):
    """The real embedding runner, with a fault injected: any batch holding "boom" raises."""

    def run(self, prepared: Any) -> Any:
        if any(row.tolist()[:3] == self.poison for row in prepared["input_ids"]):
            raise RuntimeError("injected fault")
        return super().run(prepared)

    def load(self) -> None:
        super().load()
        self.poison = self.tokenizer("boom")["input_ids"][:3]


async def start_worker(url: str, model: str, path: str, runner_cls: type = EmbedRunner) -> Worker:
    settings = ModelSettings(
        name=model, model_path=path, torch_threads=1, max_batch_size=16, dtype="fp32"
    )
    runner = runner_cls(settings)
    runner.load()
    limits = QueueSettings(block_ms=100)
    worker = Worker(StreamQueue(connect(url), model, "c1", limits), runner, settings, limits)
    worker.start()
    return worker


async def wait_results(r: Any, model: str, ids: list[str], timeout_s: float = 30) -> list[dict]:
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await r.mget([result_key(model, i) for i in ids])
            if all(v is not None for v in raw):
                return [orjson.loads(v) for v in raw]
            await asyncio.sleep(0.05)


def test_a_poison_job_fails_alone_and_the_batch_runs(redis_url, model_name, tiny_bert):
    async def scenario() -> None:
        r = connect(redis_url)
        worker = await start_worker(redis_url, model_name, tiny_bert, PoisonRunner)
        texts = ["fine one", "boom", "fine two", "fine three"]
        for i, text in enumerate(texts):
            await r.xadd(
                jobs_key(model_name), {"id": f"p{i}", "input": orjson.dumps({"text": text})}
            )
        results = await wait_results(r, model_name, [f"p{i}" for i in range(4)])
        assert [x["status"] for x in results] == ["ok", "error", "ok", "ok"]
        assert results[1]["error"]["code"] == "model_failure"
        worker.check_health()
        await worker.stop(5)
        await r.aclose()

    asyncio.run(scenario())


def test_a_reply_to_that_is_not_a_stream_does_not_block_the_ack(redis_url, model_name, tiny_bert):
    async def scenario() -> None:
        r = connect(redis_url)
        await r.set(f"not-a-stream-{model_name}", "x")
        worker = await start_worker(redis_url, model_name, tiny_bert)
        await r.xadd(
            jobs_key(model_name),
            {"id": "w1", "input": '{"text": "a"}', "reply_to": f"not-a-stream-{model_name}"},
        )
        (res,) = await wait_results(r, model_name, ["w1"])
        assert res["status"] == "ok"
        await worker.stop(5)  # `ok` is counted after the push is tried, a step after the result
        assert worker.stats.ok == 1
        assert await r.xinfo_consumers(jobs_key(model_name), "workers") == []
        await r.aclose()

    asyncio.run(scenario())


def test_check_health_fails_when_a_loop_dies(redis_url, model_name, tiny_bert):
    async def scenario() -> None:
        worker = await start_worker(redis_url, model_name, tiny_bert)
        worker.check_health()
        worker._tasks["run"].cancel()  # what a crash of the loop looks like from outside
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="run loop"):
            worker.check_health()
        await worker.stop(5)

    asyncio.run(scenario())


def test_reply_to_cannot_touch_other_keys(redis_url, model_name, tiny_bert):
    async def scenario() -> None:
        r = connect(redis_url)
        victim = f"victim-{model_name}"
        await r.set(victim, "precious")
        worker = await start_worker(redis_url, model_name, tiny_bert)
        stream = jobs_key(model_name)
        await r.xadd(stream, {"id": "v1", "input": '{"text": "a"}', "reply_to": victim})
        await r.xadd(stream, {"id": "v2", "input": '{"text": "a"}', "reply_to": stream})
        await r.xadd(stream, {"id": "v3", "input": '{"text": "a"}', "reply_to": f"ok-{model_name}"})
        v1, v2, v3 = await wait_results(r, model_name, ["v1", "v2", "v3"])
        assert v1["status"] == "ok" and await r.ttl(victim) == -1
        assert await r.get(victim) == b"precious"
        # A model's own keys are refused as reply_to up front.
        assert v2["error"]["code"] == "invalid_input" and await r.ttl(stream) == -1
        assert v3["status"] == "ok" and await r.xlen(f"ok-{model_name}") == 1
        await worker.stop(5)
        await r.aclose()

    asyncio.run(scenario())


def test_results_encoded_off_the_model_thread_match_inline(redis_url, model_name, tiny_bert):
    """GPU models hand raw outputs to the finish thread; CPU ones encode inline: same results."""

    async def scenario() -> None:
        r = connect(redis_url)
        answers = {}
        for inline in (True, False):
            model = f"{model_name}-{inline}".lower()
            worker = await start_worker(redis_url, model, tiny_bert)
            worker._stage.encode_inline = inline
            for i in range(40):
                await r.xadd(jobs_key(model), {"id": f"e{i}", "input": f'{{"text": "t {i}"}}'})
            answers[inline] = await wait_results(r, model, [f"e{i}" for i in range(40)])
            assert worker.stats.ok == 40 and worker.stats.batches >= 3
            await worker.stop(5)
        for a, b in zip(answers[True], answers[False], strict=True):
            assert a["status"] == b["status"] == "ok"
            assert a["output"] == b["output"]
        await r.aclose()

    asyncio.run(scenario())


async def queue_with(
    url: str, model: str, *entries: dict[str, str]
) -> tuple[Any, StreamQueue, list]:
    """A consumer "c1" on a fresh group that has pulled `entries` (XADDed first)."""
    r = connect(url)
    q = StreamQueue(r, model, "c1", QueueSettings())
    await q.ensure_group()
    for fields in entries:
        await r.xadd(jobs_key(model), fields)
    return r, q, await q.pull(10, None)


def test_dead_letters_are_idempotent_and_a_refused_one_acks_nothing(redis_url, model_name):
    from sluice.protocol import GROUP, dead_key
    from sluice.queue import DeadLetter

    async def scenario() -> None:
        r, q, (first, second) = await queue_with(redis_url, model_name, *[{"input": "{}"}] * 2)
        stream = jobs_key(model_name)
        letter = DeadLetter(first.entry_id, {"input": "{}"}, "missing field `id`", 1)
        # Retried after a lost reply: one dead letter, not two.
        assert await q.dead_letter([letter]) == 1
        assert await q.dead_letter([letter]) == 0
        assert q.held == 1  # the other entry, still pulled and unanswered
        assert await r.xlen(dead_key(model_name)) == 1
        # The dead stream is not a stream: the entry must stay pending, not be acked.
        await r.delete(dead_key(model_name))
        await r.set(dead_key(model_name), "in the way")
        other = DeadLetter(second.entry_id, {"input": "{}"}, "missing field `id`", 1)
        with pytest.raises(Exception, match="WRONGTYPE"):
            await q.dead_letter([other])
        pending = await r.xpending_range(stream, GROUP, "-", "+", 10)
        assert [p["message_id"].decode() for p in pending] == [second.entry_id]
        await r.delete(dead_key(model_name))
        await r.aclose()

    asyncio.run(scenario())


def test_a_retried_finish_pushes_the_stored_result_again_and_never_another(redis_url, model_name):
    from sluice.protocol import GROUP
    from sluice.queue import Outcome

    async def scenario() -> None:
        job = {"id": "f1", "input": '{"text": "a"}'}
        r, q, (entry,) = await queue_with(redis_url, model_name, job)
        reply = f"reply-{model_name}"
        outcome = Outcome(entry.entry_id, "f1", b'{"id":"f1","status":"ok"}', reply)
        # The first attempt's MULTI ran, but its reply (and so the push) was lost.
        await r.set(result_key(model_name, "f1"), outcome.result_json, nx=True)
        await r.xack(jobs_key(model_name), GROUP, entry.entry_id)

        assert await q.finish([outcome]) == [True]  # the stored result is this write's own
        # Redis failed after that push but before its reply came back: the retry pushes
        # again (at-least-once, the same bytes, with the job id for readers to drop it).
        assert await q.finish([outcome]) == [True]
        # A duplicate *run* (different bytes) stores nothing and pushes the stored result.
        rerun = Outcome(entry.entry_id, "f1", b'{"id":"f1","status":"ok","x":1}', reply)
        assert await q.finish([rerun]) == [False]
        pushed = await r.xrange(reply)
        assert [f[b"id"] for _, f in pushed] == [b"f1"] * 3
        assert {f[b"result"] for _, f in pushed} == {outcome.result_json}
        assert await r.get(result_key(model_name, "f1")) == outcome.result_json
        await r.aclose()

    asyncio.run(scenario())
