"""Tenants: producers that share a Redis see, cancel and hear of only their own jobs, and can
neither trim, read nor flood the queue (issue 16, finding 7: least-privilege producers).

Each tenant is a real Redis user made by `sluice tenants add` (the code users run), against a
real redis-server 7.0; replicas are real workers (tiny BERT) connected as `sluice-worker`,
driven bare. The hostile tenant uses exactly the rights its ACL grants: raw RPUSH of any
bytes into its own inbox, FCALL, and every command a producer might try on others' keys.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from sluice import cli, scripts, tenants
from sluice.backlog import read_backlog
from sluice.client import AsyncClient
from sluice.errors import Overloaded
from sluice.exporter import read_model
from sluice.intake import EMPTY_SWEEP_GAP_S, Intake
from sluice.protocol import (
    GROUP,
    bell_key,
    dead_key,
    inbox_key,
    info_key,
    job_key,
    jobs_key,
    lane_keys,
    reply_key,
    result_key,
    stats_key,
    tenant_dead_key,
    tenant_stats_key,
)
from sluice.queue import StreamQueue, connect
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.worker import Worker
from tests.integration.test_semantics import all_stored, until

pytestmark = pytest.mark.integration


@pytest.fixture
def tenant_urls(redis_server: Any, admin_url: str, capsys: Any) -> Iterator[dict[str, str]]:
    """Two tenants, made with `sluice tenants add` as an operator would; their URLs as printed."""
    urls = {}
    for name in ("team-a", "team-b"):
        assert cli.main(["tenants", "add", name, "--redis-url", admin_url]) == 0
        printed = capsys.readouterr().out
        match = re.search(r"SLUICE_REDIS_URL=(\S+)", printed)
        assert match and f"SLUICE_TENANT={name}" in printed, printed
        urls[name] = match[1]
    yield urls
    admin = redis.Redis.from_url(admin_url)
    for name in urls:
        tenants.remove(admin, name, force=True)
    admin.close()


def embed_settings(model: str, path: str) -> ModelSettings:
    return ModelSettings(
        name=model, model_path=path, task="embed", torch_threads=1, dtype="fp32", max_batch_size=8
    )


async def start_worker(url: str, model: str, path: str, **queue: Any) -> Worker:
    limits = QueueSettings(block_ms=200, **queue)
    runner = EmbedRunner(embed_settings(model, path))
    runner.load()
    worker = Worker(StreamQueue(connect(url), model, "w1", limits), runner, runner.settings, limits)
    worker.start()
    await asyncio.wait_for(worker.ready.wait(), 15)
    return worker


def refused(client: redis.Redis, *command: Any) -> bool:
    try:
        client.execute_command(*command)
    except NoPermissionError:
        return True
    except ResponseError as exc:
        # A function's command refused: Redis names the ACL failure inside the error.
        return "can't run this command" in str(exc)
    return False


def test_tenants_submit_wait_and_cancel_only_their_own_jobs(
    r, worker_url, tenant_urls, model_name, tiny_bert
):
    r.acl_log_reset()

    async def scenario() -> None:
        worker = await start_worker(worker_url, model_name, tiny_bert)
        a = AsyncClient(tenant_urls["team-a"], tenant="team-a", recheck_s=0.5)
        b = AsyncClient(tenant_urls["team-b"], tenant="team-b", recheck_s=0.5)
        try:
            # The same ids from two tenants are two jobs: each tenant's own.
            ids = await a.submit_many(model_name, ["one", "two"], ids=["j1", "j2"])
            assert ids == ["j1", "j2"]
            assert await b.submit_many(model_name, ["other"], ids=["j1"]) == ["j1"]
            got_a = await a.wait(ids, timeout=30)
            (got_b,) = await b.wait(["j1"], timeout=30)
            assert [x.status for x in got_a] == ["ok", "ok"] and got_b.ok
            assert [x.id for x in got_a] == ids and got_b.id == "j1"
            assert got_a[0].output != got_b.output  # "one" and "other" embedded apart
            assert (
                r.exists(result_key(model_name, "team-a:j1"), result_key(model_name, "team-b:j1"))
                == 2
            )
            # A resubmitted id is not queued again; a cancel that comes first wins.
            assert await a.submit(model_name, "one", id="j1") == "j1"
            assert (await a.cancel("early", model=model_name)).status == "cancelled"
            await a.submit(model_name, "too late", id="early")
            (late,) = await a.wait(["early"], timeout=10)
            assert late.status == "cancelled" and late.id == "early"
            # Another tenant cannot cancel, nor read, team-a's job: its keys are not its own.
            with pytest.raises(NoPermissionError):
                await b.redis.set(result_key(model_name, "team-a:j2"), "forged")
            with pytest.raises(NoPermissionError):
                await b.redis.get(result_key(model_name, "team-a:j2"))
            await until(lambda: _pending_zero(r, model_name), what="every entry acked")
            # j1, j2 and b's j1; `early` was answered at its submit (`done`), never queued.
            assert worker.stats.intake_moved == 3 and worker.stats.ok == 3
        finally:
            await a.close()
            await b.close()
            await worker.stop()

    asyncio.run(scenario())
    assert not r.llen(inbox_key(model_name, "team-a")) and not r.exists(bell_key(model_name))
    # Through all of it, no command of a tenant or of the worker was refused, but the two
    # tries above.
    denials = {(e["username"], e["object"]) for e in r.acl_log()}
    assert denials == {("sluice-tenant-team-b", result_key(model_name, "team-a:j2"))}, denials


async def _pending_zero(r: redis.Redis, model: str) -> bool:
    return all(
        g["pending"] == 0 for g in r.xinfo_groups(jobs_key(model)) if g["name"] == b"workers"
    )


def test_a_tenant_is_refused_everything_but_its_own_submits(r, tenant_urls, model_name, worker_url):
    a = redis.Redis.from_url(tenant_urls["team-a"])
    lane = jobs_key(model_name)
    # A lane with its group and an entry, as a replica leaves it.
    r.xgroup_create(lane, GROUP, id="0", mkstream=True)
    r.xadd(lane, {"id": "x", "input": "{}"})
    r.hset(info_key(model_name), mapping={"task": "embed", "max_queue_depth": 0})
    r.function_load(scripts.LIBRARY, replace=True)  # as a replica does when it registers
    other_inbox = inbox_key(model_name, "team-b")
    other_reply = reply_key(model_name, "team-b")
    r.xadd(other_reply, {"id": "team-b:j", "result": "{}"})
    for command in (
        # The lanes: no XADD at all (so no MAXLEN/MINID trim, no explicit or maximal id), no
        # read of queued inputs, no delete, trim or group change.
        ("XADD", lane, "*", "id", "a", "input", "{}"),
        ("XADD", lane, "MAXLEN", "0", "*", "id", "a", "input", "{}"),
        ("XADD", lane, "18446744073709551615-18446744073709551615", "id", "a", "input", "{}"),
        ("XADD", jobs_key(model_name, "high"), "*", "id", "a", "input", "{}"),
        ("XRANGE", lane, "-", "+"),
        ("XREAD", "STREAMS", lane, "0"),
        ("XREADGROUP", "GROUP", GROUP, "thief", "STREAMS", lane, ">"),
        ("XACK", lane, GROUP, "0-1"),
        ("XCLAIM", lane, GROUP, "thief", "0", "0-1"),
        ("DEL", lane),
        ("XTRIM", lane, "MAXLEN", "0"),
        ("XDEL", lane, "0-1"),
        ("XGROUP", "DESTROY", lane, GROUP),
        ("XGROUP", "SETID", lane, GROUP, "$"),
        # Dead letters, registration, shared counters, the registries.
        ("XRANGE", dead_key(model_name), "-", "+"),
        ("HSET", info_key(model_name), "max_queue_depth", "1"),
        ("DEL", info_key(model_name)),
        ("HINCRBY", stats_key(model_name), "rejected", "1"),
        ("HINCRBY", tenant_stats_key(model_name, "team-b"), "rejected", "1"),
        ("SADD", "sluice:models", "evil"),
        ("SADD", "sluice:tenants", "evil"),
        ("SREM", "sluice:tenants", "team-b"),
        # Other tenants' jobs: their dedupe records (squatting an id), results (forging or
        # reading an answer, cancelling), inboxes and reply streams; and unscoped ids.
        ("SET", job_key(model_name, "team-b:j"), "squat"),
        ("GET", job_key(model_name, "team-b:j")),
        ("SET", job_key(model_name, "j"), "squat"),
        ("SET", result_key(model_name, "team-b:j"), "forged"),
        ("GET", result_key(model_name, "team-b:j")),
        ("SET", result_key(model_name, "j"), "forged"),
        ("RPUSH", other_inbox, '{"id": "j"}'),
        ("LRANGE", other_inbox, "0", "-1"),
        ("XREAD", "STREAMS", other_reply, "0"),
        ("DEL", other_reply),
        ("XADD", other_reply, "*", "id", "team-b:j", "result", "{}"),
        # The bell: ring it, never silence it.
        ("DEL", bell_key(model_name)),
        ("LPOP", bell_key(model_name)),
        # The shared producer's function XADDs: refused inside, for a tenant.
        (
            "FCALL",
            "sluice_submit",
            8,
            lane,
            *[jobs_key(model_name, p) for p in ("high", "normal", "low")],
            info_key(model_name),
            job_key(model_name, "team-a:z"),
            result_key(model_name, "team-a:z"),
            stats_key(model_name),
            "id",
            "team-a:z",
            "input",
            "{}",
        ),
        # And the server.
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("ACL", "LIST"),
        ("FUNCTION", "LOAD", "REPLACE", "#!lua name=sluice\n"),
    ):
        assert refused(a, *command), f"a tenant may run {command}"
    assert r.xlen(lane) == 1 and r.xlen(other_reply) == 1 and not r.exists(other_inbox)
    assert r.hget(info_key(model_name), "max_queue_depth") == b"0"
    # What it needs, it has: its own inbox, the bell, its own keys, the lanes' depth.
    assert a.rpush(inbox_key(model_name, "team-a"), '{"id": "mine"}') == 1
    assert a.rpush(bell_key(model_name), "1") == 1
    assert a.set(result_key(model_name, "team-a:j"), "{}") and a.xlen(lane) == 1
    a.close()


TEXT = orjson.dumps({"text": "hi"}).decode()  # `input` as a stream carries it: JSON text
HOSTILE = [
    # (element, its fate): "dead" (no id to answer: the tenant's own dead stream), or the id
    # it is answered under and the status it ends with.
    (b"not json at all", "dead"),
    (b"[1, 2, 3]", "dead"),
    (b"{}", "dead"),
    (b'{"id": 5, "input": "{}"}', "dead"),
    (b'{"id": "has space", "input": "{}"}', "dead"),
    (orjson.dumps({"id": "x" * 200, "input": "{}"}), "dead"),
    (b'"just a string"', "dead"),
    (b"\xff\xfe\x00binary", "dead"),
    (orjson.dumps({"id": "huge", "input": "x" * 500_000}), "dead"),  # over max_element_bytes
    # A valid id and a bad field: answered `invalid_input`, never re-encoded (an object
    # `input` would lose float digits to cjson).
    (
        orjson.dumps(
            {
                "id": "obj",
                "input": {"text": "hi", "w": 0.1234567890123456},
                "reply_to": "sluice:reply:team-a:{told}",
            }
        ),
        "error",
    ),
    (orjson.dumps({"id": "wide", "input": TEXT, **{f"f{i}": "v" for i in range(200)}}), "error"),
    (b'{"id": "deep", "input": ' + b"[" * 900 + b"]" * 900 + b"}", "error"),
    # A forged tenant, an id naming another tenant: scoped to team-a whatever it says.
    (orjson.dumps({"id": "x", "sluice.tenant": "team-b", "tenant": "team-b", "input": TEXT}), "ok"),
    (orjson.dumps({"id": "team-b:y", "input": TEXT}), "ok"),
    # A reply stream of team-b: refused (answered, nothing pushed there).
    (
        orjson.dumps({"id": "spy", "input": TEXT, "reply_to": "sluice:reply:team-b:{spied}"}),
        "error",
    ),
    # The plain forms: a lane, a deadline long past (a number), JSON null, an odd priority.
    (
        orjson.dumps(
            {"id": "txt", "input": orjson.dumps({"text": 'a/b\\c"d'}).decode(), "priority": "high"}
        ),
        "ok",
    ),
    (orjson.dumps({"id": "old", "input": TEXT, "deadline_ms": 1}), "expired"),
    (orjson.dumps({"id": "nul", "input": TEXT, "params": None, "priority": ["odd"]}), "ok"),
    # The same id again: one job, one answer.
    (orjson.dumps({"id": "txt", "input": TEXT}), "dropped"),
]


def _fate_key(element: bytes) -> str:
    return f"team-a:{orjson.loads(element)['id']}"


def test_hostile_inbox_elements_are_answered_as_the_tenants_own_or_dead_lettered(
    r, worker_url, tenant_urls, model_name, tiny_bert
):
    a = redis.Redis.from_url(tenant_urls["team-a"])
    inbox = inbox_key(model_name, "team-a")
    for element, _ in HOSTILE:
        a.rpush(inbox, element)
    a.rpush(bell_key(model_name), "1")
    fates = {_fate_key(e): f for e, f in HOSTILE if f not in ("dead", "dropped")}
    dead = sum(f == "dead" for _, f in HOSTILE)
    mine = tenant_dead_key(model_name, "team-a")

    async def scenario() -> None:
        worker = await start_worker(worker_url, model_name, tiny_bert)
        try:
            await until(lambda: _done(r, model_name, set(fates), mine, dead), what="all handled")
            await until(lambda: _pending_zero(r, model_name), what="every entry acked")
            assert worker._intake.stats.dropped == 1 and worker._intake.stats.dead == dead
        finally:
            await worker.stop()

    asyncio.run(scenario())
    results = {k: orjson.loads(r.get(result_key(model_name, k))) for k in fates}
    assert {k: v["status"] for k, v in results.items()} == fates
    assert "sluice:reply:team-a:" in results["team-a:spy"]["error"]["message"]
    assert "must be a string" in results["team-a:obj"]["error"]["message"]
    # Its refusal reached the stream it named, as every final outcome does.
    ((_, told),) = r.xrange("sluice:reply:team-a:{told}")
    assert orjson.loads(told[b"result"])["id"] == "team-a:obj"
    assert "over 64 fields" in results["team-a:wide"]["error"]["message"]
    # Nothing under team-b's names, nothing pushed into its streams, nothing in the shared
    # dead stream: a tenant's poison stays on its own.
    assert not r.exists(result_key(model_name, "team-b:y"), result_key(model_name, "x"))
    assert not r.exists("sluice:reply:team-b:{spied}") and not r.exists(dead_key(model_name))
    letters = r.xrange(mine)
    assert len(letters) == dead
    for _, fields in letters:
        assert fields[b"sluice.tenant"] == b"team-a"
        assert b"inbox element refused" in fields[b"reason"]
        assert len(fields.get(b"raw", b"")) <= 1024
    assert not r.llen(inbox) and not r.exists(bell_key(model_name))
    a.close()


async def _done(
    r: redis.Redis, model: str, answered: set[str], dead_stream: str, dead: int
) -> bool:
    stored = r.exists(*(result_key(model, k) for k in answered))
    return stored == len(answered) and r.xlen(dead_stream) == dead


def test_a_flooding_tenant_gets_no_more_than_the_queue_bound_and_one_job_per_id(
    r, worker_url, tenant_urls, model_name, tiny_bert
):
    """Raw RPUSHes skip sluice_enqueue's admission: the intake applies it again. 5,000 copies
    of one id, all high priority, with max_queue_depth 10: one job; and 500 distinct ids move
    no faster than the lanes have room, so another tenant's submits still get in."""
    r.hset(info_key(model_name), mapping={"task": "embed", "max_queue_depth": 10})
    a = redis.Redis.from_url(tenant_urls["team-a"])
    inbox = inbox_key(model_name, "team-a")
    copy = orjson.dumps({"id": "x", "input": TEXT, "priority": "high"})
    for _ in range(5):
        a.rpush(inbox, *[copy] * 1000)
    a.rpush(inbox, *[orjson.dumps({"id": f"d{i}", "input": TEXT}) for i in range(500)])
    a.rpush(bell_key(model_name), "1")

    async def scenario() -> None:
        worker = await start_worker(worker_url, model_name, tiny_bert, max_queue_depth=10)
        b = AsyncClient(tenant_urls["team-b"], tenant="team-b", recheck_s=0.5)
        try:
            depths = []
            for _ in range(40):
                depths.append(sum(_depth(r, key) for key in lane_keys(model_name)))
                await asyncio.sleep(0.02)
            # team-b's submit gets in while team-a's flood drains (retrying when full).
            (got,) = await _submit_until_in(b, model_name, "b1")
            assert got.ok
            await until(lambda: _inbox_empty(r, inbox), 60, what="the flood drained")
            await until(lambda: _pending_zero(r, model_name), what="every entry acked")
            assert max(depths) <= 10 + 64  # the bound, plus at most one pass's overshoot
            # x ran once: copies met while it was queued were dropped, later ones (answered)
            # were moved and answered from its result, never run again.
            intake = worker._intake.stats
            assert intake.dropped + intake.moved == 5501 and intake.dropped > 0  # + team-b
            assert worker.stats.duplicates == 0
        finally:
            await b.close()
            await worker.stop()

    asyncio.run(scenario())
    assert r.exists(*(result_key(model_name, f"team-a:d{i}") for i in range(500))) == 500
    assert orjson.loads(r.get(result_key(model_name, "team-a:x")))["status"] == "ok"
    a.close()


def _depth(r: redis.Redis, key: str) -> int:
    if not r.exists(key):
        return 0
    group = next((g for g in r.xinfo_groups(key) if g["name"] == b"workers"), None)
    return r.xlen(key) if group is None else int(group["lag"] or 0) + int(group["pending"])


async def _inbox_empty(r: redis.Redis, inbox: str) -> bool:
    return not r.llen(inbox)


async def _submit_until_in(client: AsyncClient, model: str, job_id: str) -> list[Any]:
    for _ in range(200):
        try:
            await client.submit(model, "from team-b", id=job_id)
            return await client.wait([job_id], timeout=30)
        except Overloaded:
            await asyncio.sleep(0.05)
    raise AssertionError("team-b never got in")


def test_an_element_cancelled_before_its_move_still_gets_its_answer_pushed(
    r, worker_url, tenant_urls, model_name, tiny_bert
):
    """A cancel that comes while the job waits in its inbox: the intake moves it all the same,
    so that the replica pushes the `cancelled` answer to the stream the job named (found by
    the 30-minute chaos run: a dropped element's reply_to heard nothing)."""
    stream = reply_key("told", "team-a")
    a = redis.Redis.from_url(tenant_urls["team-a"])

    async def scenario() -> None:
        client = AsyncClient(tenant_urls["team-a"], tenant="team-a")
        try:
            await client.cancel("c1", model=model_name)  # SET NX of `cancelled`, as a tenant
        finally:
            await client.close()
        element = orjson.dumps({"id": "c1", "input": TEXT, "reply_to": stream})
        a.rpush(inbox_key(model_name, "team-a"), element)
        a.rpush(bell_key(model_name), "1")
        worker = await start_worker(worker_url, model_name, tiny_bert)
        try:
            await until(lambda: _pushed(r, stream, 1), what="the cancelled answer pushed")
            await until(lambda: _pending_zero(r, model_name), what="every entry acked")
            assert worker.stats.ok == 0  # never run
        finally:
            await worker.stop()

    asyncio.run(scenario())
    ((_, fields),) = r.xrange(stream)
    assert orjson.loads(fields[b"result"])["status"] == "cancelled"
    a.close()


def test_text_that_json_escaping_doubles_is_answered_and_a_job_too_large_is_refused(
    r, worker_url, tenant_urls, model_name, tiny_bert
):
    async def scenario() -> None:
        worker = await start_worker(worker_url, model_name, tiny_bert)
        a = AsyncClient(tenant_urls["team-a"], tenant="team-a", recheck_s=0.5)
        try:
            # Slashes and quotes: under max_input_bytes, twice that once cjson escapes them
            # into the inbox element; answered ok.
            ok = await a.submit(model_name, "/" * 20_000 + '"' * 10_000, id="escaped")
            # Larger than the intake decodes: answered `input_too_large` at the submit.
            big = await a.submit(model_name, "x" * 500_000, id="big")
            escaped, too_big = await a.wait([ok, big], timeout=30)
            assert escaped.ok, escaped
            assert too_big.status == "error" and too_big.error["code"] == "input_too_large"
        finally:
            await a.close()
            await worker.stop()

    asyncio.run(scenario())
    assert not r.exists(tenant_dead_key(model_name, "team-a"))


def test_tenant_jobs_wait_in_inboxes_at_zero_replicas_count_as_backlog_and_are_bounded(
    r, scaler_url, worker_url, tenant_urls, model_name, tiny_bert
):
    # A model registered earlier (a replica ran, then scaled to zero), with a small bound.
    r.hset(info_key(model_name), mapping={"task": "embed", "max_queue_depth": 3})
    r.function_load(scripts.LIBRARY, replace=True)  # as the replica that ran did

    async def scenario() -> None:
        a = AsyncClient(tenant_urls["team-a"], tenant="team-a", recheck_s=0.5)
        try:
            with pytest.raises(Overloaded) as full:
                await a.submit_many(model_name, ["1", "2", "3", "4", "5"])
            assert len(full.value.accepted) == 3 and len(full.value.rejected) == 2
            scaler = redis.Redis.from_url(scaler_url, decode_responses=True)
            backlog = read_backlog(scaler, model_name)
            assert backlog.inbox == 3 and backlog.waiting == 3 and backlog.total == 3
            reading = read_model(scaler, model_name)
            assert reading.backlog.inbox == 3 and reading.rejections == 2
            # A replica starts: the inbox is moved, every accepted job answered once.
            worker = await start_worker(worker_url, model_name, tiny_bert)
            try:
                results = await a.wait(full.value.accepted, timeout=30)
                assert all(x.ok for x in results)
                await until(lambda: _pending_zero(r, model_name), what="every entry acked")
                after = read_backlog(scaler, model_name)
                assert after.inbox == 0 and after.waiting == 0 and after.added == 3
            finally:
                await worker.stop()
            scaler.close()
        finally:
            await a.close()

    asyncio.run(scenario())


def test_the_intake_moves_a_backlog_larger_than_one_pass(
    r, worker_url, tenant_urls, model_name, tiny_bert
):
    a = redis.Redis.from_url(tenant_urls["team-a"])
    b = redis.Redis.from_url(tenant_urls["team-b"])
    n = 300  # several passes of 64 per inbox; one ring only
    for i in range(n):
        a.rpush(
            inbox_key(model_name, "team-a"), orjson.dumps({"id": f"a{i}", "input": {"text": "x"}})
        )
        b.rpush(
            inbox_key(model_name, "team-b"), orjson.dumps({"id": f"b{i}", "input": {"text": "y"}})
        )
    a.rpush(bell_key(model_name), "1")

    async def scenario() -> None:
        worker = await start_worker(worker_url, model_name, tiny_bert)
        aio = connect(worker_url)
        try:
            ids = [f"team-a:a{i}" for i in range(n)] + [f"team-b:b{i}" for i in range(n)]
            await all_stored(aio, model_name, ids, timeout_s=60)
        finally:
            await worker.stop()
            await aio.aclose()

    asyncio.run(scenario())
    assert not r.exists(inbox_key(model_name, "team-a"), inbox_key(model_name, "team-b"))
    a.close()
    b.close()


def test_a_removed_tenant_leaves_nothing_for_the_next_one_of_its_name(r, admin_url, model_name):
    admin = redis.Redis.from_url(admin_url)  # bytes, as a plain client gives them
    tenants.add(admin, "team-c", "pw-team-c-0123456789")
    r.sadd("sluice:models", model_name)
    r.rpush(inbox_key(model_name, "team-c"), "{}")
    mine = [
        result_key(model_name, "team-c:j"),
        job_key(model_name, "team-c:j"),
        reply_key("c1", "team-c"),
        tenant_dead_key(model_name, "team-c"),
        tenant_stats_key(model_name, "team-c"),
    ]
    r.set(mine[0], "{}")
    r.set(mine[1], "1-0")
    r.xadd(mine[2], {"id": "team-c:j", "result": "{}"})
    r.xadd(mine[3], {"reason": "x"})
    r.hincrby(mine[4], "rejected", 1)
    others = [result_key(model_name, "team-cc:j"), result_key(model_name, "team-d:team-c:j")]
    for key in others:
        r.set(key, "{}")
    with pytest.raises(RuntimeError, match="1 jobs in its inboxes"):
        tenants.remove(admin, "team-c")
    assert [t.name for t in tenants.listing(admin)].count("team-c") == 1
    assert tenants.remove(admin, "team-c", force=True) == 1
    assert b"sluice-tenant-team-c" not in admin.acl_users()
    assert not r.exists(inbox_key(model_name, "team-c"), *mine)
    assert r.exists(*others) == 2  # another tenant's, however its ids look
    r.delete(*others)
    r.srem("sluice:models", model_name)
    admin.close()


def test_a_lane_that_refuses_writes_leaves_the_inbox_whole(r, tenant_urls, model_name):
    """An element is popped only once it is an entry: a lane whose ids are exhausted (which
    a shared producer's XADD with a maximal id can do) fails the move, and loses nothing."""
    r.hset(info_key(model_name), mapping={"task": "embed", "max_queue_depth": 0})
    r.function_load(scripts.LIBRARY, replace=True)
    lane = jobs_key(model_name)
    r.xadd(lane, {"id": "max", "input": "{}"}, id="18446744073709551615-18446744073709551615")

    async def scenario() -> None:
        a = AsyncClient(tenant_urls["team-a"], tenant="team-a")
        aio = connect(_url(r))
        intake = Intake(aio, model_name, QueueSettings())
        try:
            await a.submit_many(model_name, ["1", "2", "3"], ids=["j1", "j2", "j3"])
            for _ in range(3):
                with pytest.raises(ResponseError, match="exhausted"):
                    await intake.move(["team-a"])
            assert r.llen(inbox_key(model_name, "team-a")) == 3
            # The operator repairs the lane: every job moves, once.
            r.delete(lane)
            r.xgroup_create(lane, GROUP, id="0", mkstream=True)
            assert (await intake.move(["team-a"])).moved == 3
            assert r.xlen(lane) == 3 and not r.llen(inbox_key(model_name, "team-a"))
        finally:
            await a.close()
            await aio.aclose()

    asyncio.run(scenario())


def _url(r: redis.Redis) -> str:
    kwargs = r.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def test_a_field_named_tenant_from_a_shared_producer_is_just_a_field(
    r, worker_url, model_name, tiny_bert
):
    """Protocol v1 ignores unknown fields: `tenant` stays one. The intake's own mark is
    `sluice.tenant`; forged by a shared producer, the job is refused, and told so."""
    lane = jobs_key(model_name)
    stream = reply_key(f"shared-{model_name}")
    r.xadd(lane, {"id": "j1", "input": TEXT, "tenant": "acme", "reply_to": stream})
    r.xadd(lane, {"id": "j2", "input": TEXT, "sluice.tenant": "acme", "reply_to": stream})

    async def scenario() -> None:
        worker = await start_worker(worker_url, model_name, tiny_bert)
        aio = connect(_url(r))
        try:
            await all_stored(aio, model_name, ["j1", "j2"])
            await until(lambda: _pushed(r, stream, 2), what="both pushed")
        finally:
            await worker.stop()
            await aio.aclose()

    asyncio.run(scenario())
    j1, j2 = (orjson.loads(r.get(result_key(model_name, i))) for i in ("j1", "j2"))
    assert j1["status"] == "ok"
    assert j2["status"] == "error" and "sluice.tenant" in j2["error"]["message"]


async def _pushed(r: redis.Redis, stream: str, n: int) -> bool:
    return r.xlen(stream) >= n


def test_many_tenants_move_in_one_sweep_and_rings_cost_a_bounded_number_of_passes(
    r, admin_url, model_name
):
    names = [f"many-{i}" for i in range(300)]  # more than one pass's 128 inboxes
    r.sadd("sluice:tenants", *names)
    r.hset(info_key(model_name), mapping={"task": "embed", "max_queue_depth": 0})
    for name in names:
        r.rpush(inbox_key(model_name, name), orjson.dumps({"id": "j", "input": TEXT}))
    r.rpush(bell_key(model_name), "1")

    async def scenario() -> None:
        aio = connect(admin_url)
        intake = Intake(aio, model_name, QueueSettings(block_ms=200))
        stop = asyncio.Event()
        task = asyncio.create_task(intake.run(stop))
        try:
            await until(lambda: _lane_len(r, model_name, 300), 10, what="every inbox moved")
            # A tenant ringing as fast as it can: the intake sweeps at most every
            # EMPTY_SWEEP_GAP_S (3 script calls a sweep for 300 tenants).
            before = _admit_calls(r)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                r.rpush(bell_key(model_name), *["1"] * 50)
                await asyncio.sleep(0.001)
            calls = _admit_calls(r) - before
            assert calls <= 3 * (1.0 / EMPTY_SWEEP_GAP_S + 2), calls
        finally:
            stop.set()
            r.rpush(bell_key(model_name), "1")
            await asyncio.wait_for(task, 5)
            await aio.aclose()

    asyncio.run(scenario())
    r.srem("sluice:tenants", *names)


async def _lane_len(r: redis.Redis, model: str, n: int) -> bool:
    return r.xlen(jobs_key(model)) == n


def _admit_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
