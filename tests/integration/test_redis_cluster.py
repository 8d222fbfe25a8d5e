"""Sluice on a real Redis Cluster: three masters started here, bare workers (no Ray), the SDK.

Each model's keys share its `{M}` slot; the models are picked so that their slots belong to
different masters, so every step of a job's life (pull script, result-and-ack, reply pushes to
a stream in another slot, dead letters, the admission function) runs against the node that
owns it, and across nodes in one pipeline. Workers connect as `sluice-worker` and the SDK as
`sluice-producer`, with the rights of docs/security.md plus the two a cluster client needs
(docs/scaling.md); the admin stands for raw producers and operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis
from redis.exceptions import ResponseError

from sluice import cli
from sluice.client import AsyncClient
from sluice.connection import RedisModeError, connect
from sluice.protocol import (
    GROUP,
    dead_key,
    info_key,
    job_key,
    jobs_key,
    lane_keys,
    result_key,
)
from sluice.queue import Outcome, StreamQueue
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.stack import LocalRedisCluster, free_port
from sluice.wire import send_many
from sluice.worker import Worker
from tests.acl_docs import PLACEHOLDERS, PRODUCER, WORKER, doc_acl_lines

pytestmark = pytest.mark.integration

LIMITS = QueueSettings(block_ms=100)
PASSWORDS = {user: secrets.token_hex(16) for user in PLACEHOLDERS}
#: What docs/scaling.md adds for a cluster: redis-py reads the slot map (CLUSTER SLOTS) and
#: asks a node where the keys of XREADGROUP and XREAD are (COMMAND, COMMAND GETKEYS).
CLUSTER_RIGHTS = ("+cluster|slots", "+command")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    lines = doc_acl_lines(PASSWORDS)
    lines += [f"ACL SETUSER {user} {' '.join(CLUSTER_RIGHTS)}" for user in (WORKER, PRODUCER)]
    servers = LocalRedisCluster(masters=3, acl_lines=lines).start()
    yield servers
    servers.cleanup()


def url_of(cluster: LocalRedisCluster, user: str) -> str:
    return cluster.url_for(user, PASSWORDS[user])


def refusals(cluster: LocalRedisCluster) -> list[str]:
    """What ACL LOG recorded on any node: a right missing from the docs shows up here."""
    found = []
    for server in cluster.servers:
        with redis.Redis.from_url(server.url, decode_responses=True) as node:
            found += [f"{e['username']}: {e['object']} ({e['reason']})" for e in node.acl_log()]
    return found


def master_port(node_url: str, key: str) -> int:
    """The port of the master that owns `key`, as the cluster itself says (CLUSTER KEYSLOT
    and CLUSTER SLOTS), not as the client under test computes it."""
    with redis.Redis.from_url(node_url) as node:
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", key))
        slots: Any = node.execute_command("CLUSTER", "SLOTS")
    for start, end, master, *_ in slots:
        if int(start) <= slot <= int(end):
            return int(master[1])
    raise AssertionError(f"no master owns slot {slot} of {key}")


def models_on_distinct_masters(cluster: LocalRedisCluster, count: int) -> list[str]:
    by_master: dict[int, str] = {}
    while len(by_master) < count:
        model = f"c-{uuid.uuid4().hex[:8]}"
        by_master.setdefault(master_port(cluster.url, jobs_key(model)), model)
    models = list(by_master.values())
    for model in models:
        keys = [
            *lane_keys(model),
            info_key(model),
            dead_key(model),
            result_key(model, "x"),
            job_key(model, "x"),
        ]
        assert {master_port(cluster.url, k) for k in keys} == {master_port(cluster.url, keys[0])}
    return models


@contextlib.asynccontextmanager
async def workers_for(url: str, models: list[str], path: str) -> AsyncIterator[list[Worker]]:
    """A bare worker per model, registered; stopped again however the test ends (a worker
    left running keeps the process alive)."""
    workers: list[Worker] = []
    try:
        for model in models:
            settings = ModelSettings(
                name=model, model_path=path, torch_threads=1, max_batch_size=16, dtype="fp32"
            )
            runner = EmbedRunner(settings)
            runner.load()
            queue = StreamQueue(connect(url, cluster=True), model, f"w-{model}", LIMITS)
            workers.append(Worker(queue, runner, settings, LIMITS))
            workers[-1].start()
            await asyncio.wait_for(workers[-1].ready.wait(), timeout=15)
        yield workers
    finally:
        for worker in workers:
            await worker.stop(5)
            await worker.queue.redis.aclose()


def reply_stream() -> str:
    """A reply stream in a slot of its own, under `sluice:` where the worker user may write."""
    return f"sluice:reply:{{test-{uuid.uuid4().hex[:8]}}}"


async def wait_results(r: Any, model: str, ids: list[str], timeout_s: float = 30) -> list[dict]:
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await r.mget([result_key(model, i) for i in ids])  # one slot: one MGET
            if all(v is not None for v in raw):
                return [orjson.loads(v) for v in raw]
            await asyncio.sleep(0.05)


async def pushed_to(r: Any, stream: str, at_least: int, timeout_s: float = 10) -> list[dict]:
    """The results pushed to a reply stream, in order, once there are `at_least` of them (a
    push follows the stored result, so a stored result does not mean it is there yet)."""
    async with asyncio.timeout(timeout_s):
        while await r.xlen(stream) < at_least:
            await asyncio.sleep(0.05)
    return [orjson.loads(fields[b"result"]) for _, fields in await r.xrange(stream)]


async def unacked(r: Any, model: str) -> int:
    total = 0
    for key in lane_keys(model):
        for group in await r.xinfo_groups(key):
            if group["name"] == GROUP.encode():
                total += int(group["pending"]) + int(group["lag"] or 0)
    return total


def test_models_on_three_masters_each_answer_every_job_once(cluster, tiny_bert):
    async def scenario() -> None:
        models = models_on_distinct_masters(cluster, 3)
        assert len({master_port(cluster.url, jobs_key(m)) for m in models}) == 3
        r = connect(cluster.url, cluster=True)
        raw_replies = reply_stream()
        async with workers_for(url_of(cluster, WORKER), models, tiny_bert) as workers:
            # FCALL runs on the node of its keys: the submit library must be on every master.
            for server in cluster.servers:
                with redis.Redis.from_url(server.url) as node:
                    assert node.function_list(library="sluice"), f"no library on {server.port}"
            async with AsyncClient(url_of(cluster, PRODUCER), cluster=True) as client:
                sdk_ids = {}
                for m in models:
                    sdk_ids[m] = await client.submit_many(m, [f"{m} sdk {i}" for i in range(8)])
                    for i in range(8):
                        text = orjson.dumps({"text": f"raw {i}"})
                        fields = {"id": f"raw-{i}", "input": text, "reply_to": raw_replies}
                        await r.xadd(jobs_key(m), dict[Any, Any](fields))
                for m in models:
                    results = await client.wait(sdk_ids[m], timeout=30)
                    assert [x.status for x in results] == ["ok"] * 8
                    assert all(len(x.output) == 32 for x in results)  # the tiny BERT's width
                sdk_pushed = await pushed_to(r, client.reply_stream, 8 * len(models))
            for m in models:
                stored = await wait_results(r, m, [f"raw-{i}" for i in range(8)])
                assert {x["status"] for x in stored} == {"ok"}
                assert {x["model"] for x in stored} == {m}
            raw_pushed = await pushed_to(r, raw_replies, 8 * len(models))
        # The workers have stopped, their writes drained: one run and one answer per job.
        for m, worker in zip(models, workers, strict=True):
            assert worker.stats.ok == 16 and worker.stats.duplicates == 0
            assert await unacked(r, m) == 0
            assert await r.xlen(dead_key(m)) == 0
        # Every SDK job pushed to its client once; every raw job to its reply stream once.
        assert Counter(x["id"] for x in sdk_pushed) == Counter(
            i for ids in sdk_ids.values() for i in ids
        )
        assert Counter((x["model"], x["id"]) for x in raw_pushed) == Counter(
            (m, f"raw-{i}") for m in models for i in range(8)
        )
        assert await r.xlen(raw_replies) == len(raw_pushed)  # and nothing after the stop
        assert refusals(cluster) == []
        await r.delete(raw_replies)
        await r.aclose()

    asyncio.run(scenario())


def test_cancel_and_malformed_entries_on_a_cluster(cluster, tiny_bert, monkeypatch, capsys):
    async def scenario() -> None:
        (model,) = models_on_distinct_masters(cluster, 1)
        r = connect(cluster.url, cluster=True)
        replies = reply_stream()
        async with workers_for(url_of(cluster, WORKER), [model], tiny_bert) as (worker,):
            # Masters that lost their scripts and library (restarted empty, say) get them
            # again: the scripts from the worker, the library from an SDK client that may
            # load it (the admin here: sluice-producer may not).
            await r.script_flush()
            await r.function_flush()
            async with AsyncClient(cluster.url, cluster=True) as client:
                done = await client.submit(model, "runs to the end")
                assert (await client.result(done)).ok
                # Too late to cancel: the job's one result stays the ok one.
                assert (await client.cancel(done)).status == "ok"
                # Cancelled before it is queued: acked unrun, answered `cancelled`.
                assert (await client.cancel("early", model=model)).status == "cancelled"
            stream = jobs_key(model)
            await r.xadd(stream, {"id": "early", "input": '{"text": "x"}', "reply_to": replies})
            await r.xadd(stream, {"id": "bad-json", "input": "{nope", "reply_to": replies})
            await r.xadd(stream, {"input": '{"text": "an entry with no id"}'})
            early, bad = await wait_results(r, model, ["early", "bad-json"])
            assert early["status"] == "cancelled"
            assert bad["status"] == "error" and bad["error"]["code"] == "invalid_input"
            async with asyncio.timeout(10):
                while not (dead := await r.xrange(dead_key(model))):
                    await asyncio.sleep(0.05)
            ((_, fields),) = dead
            assert fields[b"reason"] == b"missing field `id`"
            assert fields[b"input"] == b'{"text": "an entry with no id"}'
            pushed = await pushed_to(r, replies, 2)
            assert sorted((x["id"], x["status"]) for x in pushed) == [
                ("bad-json", "error"),
                ("early", "cancelled"),
            ]
        assert await unacked(r, model) == 0
        assert await r.xlen(replies) == 2  # still, with the worker stopped
        assert worker.stats.ok == 1  # `early` and the malformed entries never ran
        await r.delete(replies)
        await r.aclose()
        # The operator's view, over every master.
        monkeypatch.setenv("SLUICE_REDIS_CLUSTER", "true")
        capsys.readouterr()
        assert cli.main(["status", "--json", "--redis-url", cluster.url]) == 0
        rows = {row["model"]: row for row in orjson.loads(capsys.readouterr().out)}
        assert rows[model]["registered"] and rows[model]["dead_letters"] == 1
        assert rows[model]["depth"] == 0
        assert cli.main(["dlq", "list", model, "--json", "--redis-url", cluster.url]) == 0
        (letter,) = orjson.loads(capsys.readouterr().out)
        assert letter["reason"] == "missing field `id`"

    asyncio.run(scenario())


def test_the_store_push_ack_steps_answer_on_a_cluster(cluster):
    """On a cluster the write is three pipelines (no MULTI): the results' SET NX GET, the
    pushes to reply streams on other nodes, then the acks: each result stored once, each
    entry acked on its own lane, a duplicate run stores nothing and pushes the stored result."""

    async def scenario() -> None:
        (model,) = models_on_distinct_masters(cluster, 1)
        r = connect(cluster.url, cluster=True)
        queue = StreamQueue(r, model, "w", LIMITS)
        await queue.ensure_group()
        await r.xadd(jobs_key(model, "low"), {"id": "l", "input": "{}"})
        await r.xadd(jobs_key(model, "high"), {"id": "h", "input": "{}"})
        entries = await queue.pull(10, None)
        assert [(e.fields[b"id"], e.lane) for e in entries] == [(b"h", 0), (b"l", 2)]
        replies = reply_stream()
        outcomes = [
            Outcome(
                e.entry_id,
                e.fields[b"id"].decode(),
                b'{"id": "%s"}' % e.fields[b"id"],
                replies,
                lane=e.lane,
            )
            for e in entries
        ]
        assert await queue.finish(outcomes) == [True, True]
        assert await unacked(r, model) == 0
        rerun = [replace(o, result_json=o.result_json + b" ") for o in outcomes]
        assert await queue.finish(rerun) == [False, False]
        assert await r.mget([result_key(model, "h"), result_key(model, "l")]) == [
            b'{"id": "h"}',
            b'{"id": "l"}',
        ]
        pushed = await pushed_to(r, replies, 4)
        assert [x["id"] for x in pushed] == ["h", "l", "h", "l"]
        assert pushed[:2] == pushed[2:]  # the rerun pushed the stored results, not its own
        await r.delete(replies)
        await r.aclose()

    asyncio.run(scenario())


def test_a_wrong_redis_cluster_setting_fails_clearly(cluster, redis_url, monkeypatch, capsys):
    elsewhere = next(
        m
        for m in (f"c-{uuid.uuid4().hex[:8]}" for _ in range(100))
        if master_port(cluster.url, jobs_key(m)) != cluster.servers[0].port
    )

    async def scenario() -> None:
        # One node of a cluster, reached as one server: MOVED, said plainly.
        single = connect(cluster.url)
        queue = StreamQueue(single, elsewhere, "w", LIMITS)
        with pytest.raises(RedisModeError, match="SLUICE_REDIS_CLUSTER=true"):
            await queue.ensure_group()
        async with AsyncClient(cluster.url, cluster=False) as client:
            with pytest.raises(RedisModeError, match="Redis Cluster node"):
                await client.submit(elsewhere, "x")
        await single.aclose()
        # One server, reached as a cluster.
        as_cluster = connect(redis_url, cluster=True)
        with pytest.raises(RedisModeError, match="not a cluster"):
            await as_cluster.ping()
        # No cluster there at all: an outage (retried by the worker's loops), not a bug.
        nowhere = connect(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
        with pytest.raises(redis.ConnectionError):
            await nowhere.ping()
        with pytest.raises(redis.RedisClusterException, match="'db' must be 0"):
            connect(cluster.url.replace("/0", "/1"), cluster=True)

    asyncio.run(scenario())
    monkeypatch.delenv("SLUICE_REDIS_CLUSTER", raising=False)
    assert cli.main(["dlq", "list", elsewhere, "--redis-url", cluster.url]) == 1
    assert "SLUICE_REDIS_CLUSTER=true" in capsys.readouterr().err


def test_send_many_answers_as_redis_does_on_a_cluster(cluster):
    """The cluster way of `wire.send_many` (a pipeline split by node) must give the replies
    Redis sent, as on one server: `SET … NX GET` its previous value (redis-py's own SET parser
    would have made it a bool), error replies as objects, order kept across nodes."""

    async def scenario() -> None:
        r = connect(cluster.url, cluster=True)
        try:
            keys = [f"{{wire-{i}}}:k" for i in range(6)]  # spread over the masters
            await r.lpush("{wire-0}:list", "x")
            first = await send_many(r, [("SET", k, b"v1", "NX", "GET", "EX", 60) for k in keys])
            second = await send_many(
                r,
                [
                    *[("SET", k, b"v2", "NX", "GET", "EX", 60) for k in keys],
                    ("GET", "{wire-0}:list"),
                    ("MGET", keys[1], "{wire-1}:none"),
                ],
            )
            assert first == [None] * len(keys)
            assert second[: len(keys)] == [b"v1"] * len(keys)
            assert isinstance(second[-2], ResponseError) and "WRONGTYPE" in str(second[-2])
            assert second[-1] == [b"v1", None]
        finally:
            await r.aclose()

    asyncio.run(scenario())
