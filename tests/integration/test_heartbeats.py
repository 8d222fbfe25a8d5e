"""Heartbeats: the entries of a replica killed outright are taken at once, not a visibility
timeout later; a live replica's never are, nor anyone's right after an outage.

Issue 19: `serve run` stopped by SIGTERM kills its replicas outright (Ray's driver exits and
takes the cluster with it), and the jobs they held waited a whole visibility timeout (60 s)
for the next replica. Real redis-server, the worker's own ACL user, queues driven bare; the
last test kills a real worker process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis
from redis.asyncio import Redis

from sluice.protocol import GROUP, jobs_key
from sluice.queue import StreamQueue, connect
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.stack import free_port
from tests.integration.test_leases import start
from tests.integration.test_semantics import all_stored, until

pytestmark = pytest.mark.integration

TTL_S = 0.3
# A visibility timeout no test waits out: whatever is taken here is taken by heartbeat.
LIMITS = QueueSettings(visibility_timeout_s=600, heartbeat_interval_s=0.05, heartbeat_ttl_s=TTL_S)


async def queued(r: Redis, model: str, n: int, prefix: str = "h") -> list[str]:
    lane = jobs_key(model)
    await r.xgroup_create(lane, GROUP, id="0", mkstream=True)
    ids = [f"{prefix}{i}" for i in range(n)]
    for job_id in ids:
        await r.xadd(lane, {"id": job_id, "input": '{"text": "held"}'})
    return ids


async def beat_for(seconds: float, *queues: StreamQueue) -> None:
    """Keeps these consumers' heartbeats up, as their workers' loops would."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for queue in queues:
            await queue.heartbeat()
        await asyncio.sleep(LIMITS.heartbeat_interval_s)


def test_a_silent_consumers_entries_are_taken_at_once_and_a_beating_ones_never(
    redis_url, worker_url, model_name
):
    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 6)
        beating = StreamQueue(connect(worker_url), model_name, "beating", LIMITS)
        killed = StreamQueue(connect(worker_url), model_name, "killed", LIMITS)
        reclaimer = StreamQueue(connect(worker_url), model_name, "reclaimer", LIMITS)
        await beating.heartbeat()
        held_by_beating = {e.entry_id for e in await beating.pull(3, None)}
        await killed.heartbeat()  # it lived, pulled, and was killed: its heartbeat lapses
        held_by_killed = {e.entry_id for e in await killed.pull(3, None)}
        await reclaimer.heartbeat()
        # Not yet: the reclaimer's own heartbeat has not landed for a whole TTL, so it
        # cannot tell a dead consumer from one whose heartbeat an outage interrupted.
        assert not reclaimer.trusts_heartbeats()
        assert not (await reclaimer.reclaim(100)).entries

        await beat_for(TTL_S * 1.5, beating, reclaimer)
        assert reclaimer.trusts_heartbeats()
        found = await reclaimer.reclaim(100)

        assert {e.entry_id for e in found.entries} == held_by_killed
        assert {e.deliveries for e in found.entries} == {2}  # a delivery, counted
        pending = await r.xpending_range(jobs_key(model_name), GROUP, "-", "+", 10)
        owners = {p["message_id"].decode(): p["consumer"].decode() for p in pending}
        assert owners == {
            **dict.fromkeys(held_by_beating, "beating"),
            **dict.fromkeys(held_by_killed, "reclaimer"),
        }
        for queue in (beating, killed, reclaimer):
            await queue.redis.aclose()
        await r.aclose()

    asyncio.run(scenario())


def test_after_its_own_heartbeat_failed_a_replica_trusts_no_silence_for_a_ttl(
    redis_url, worker_url, model_name
):
    """An outage lapses every heartbeat, the live replicas' too: the first replica back must
    not take their entries before they have had a TTL to beat again."""

    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 3)
        other = StreamQueue(connect(worker_url), model_name, "other", LIMITS)
        reclaimer = StreamQueue(connect(worker_url), model_name, "reclaimer", LIMITS)
        await other.heartbeat()
        assert len(await other.pull(3, None)) == 3
        await beat_for(TTL_S * 1.5, other, reclaimer)
        assert reclaimer.trusts_heartbeats()

        # The reclaimer's connection is lost (a closed port stands for Redis gone), and the
        # other's heartbeat lapses meanwhile, as in an outage.
        live = reclaimer.redis
        reclaimer.redis = connect(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
        with pytest.raises(redis.ConnectionError):
            await reclaimer.heartbeat()
        assert not reclaimer.trusts_heartbeats()
        await reclaimer.redis.aclose()
        reclaimer.redis = live
        await asyncio.sleep(TTL_S * 1.5)
        await reclaimer.heartbeat()
        assert not (await reclaimer.reclaim(100)).entries, "took a live one's entries"
        await beat_for(TTL_S * 1.5, other, reclaimer)
        assert reclaimer.trusts_heartbeats()
        assert not (await reclaimer.reclaim(100)).entries, "took a live one's entries"
        for queue in (other, reclaimer):
            await queue.redis.aclose()
        await r.aclose()

    asyncio.run(scenario())


def test_a_replica_that_leaves_hands_back_what_it_still_holds(redis_url, worker_url, model_name):
    """A stop that could not finish (past its timeout): its heartbeat ends with it, so its
    entries are taken at once; it stays in the group while it holds any."""

    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 4)
        leaving = StreamQueue(connect(worker_url), model_name, "leaving", LIMITS)
        reclaimer = StreamQueue(connect(worker_url), model_name, "reclaimer", LIMITS)
        await leaving.heartbeat()
        held = {e.entry_id for e in await leaving.pull(4, None)}
        await beat_for(TTL_S * 1.5, leaving, reclaimer)
        assert not (await reclaimer.reclaim(100)).entries

        await leaving.leave()
        await leaving.heartbeat()  # a late beat (a loop not yet cancelled) changes nothing
        found = await reclaimer.reclaim(100)

        assert {e.entry_id for e in found.entries} == held
        for queue in (leaving, reclaimer):
            await queue.redis.aclose()
        await r.aclose()

    asyncio.run(scenario())


KILLED_WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from sluice.queue import StreamQueue, connect
    from sluice.runners.embed import EmbedRunner
    from sluice.settings import ModelSettings, QueueSettings
    from sluice.worker import Worker

    url, model, path = sys.argv[1:4]

    class Stuck(EmbedRunner):
        def run(self, prepared):
            print("running", flush=True)
            time.sleep(3600)  # a batch that never ends: killed in the middle of it

    async def main():
        settings = ModelSettings(name=model, model_path=path, torch_threads=1, dtype="fp32")
        runner = Stuck(settings)
        runner.load()
        limits = QueueSettings(block_ms=100, visibility_timeout_s=600)
        queue = StreamQueue(connect(url), model, "doomed", limits)
        worker = Worker(queue, runner, settings, limits)
        worker.start()
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_the_jobs_of_a_replica_killed_outright_are_answered_in_seconds(
    redis_url, worker_url, model_name, tiny_bert
):
    """A real worker process, SIGKILLed mid-batch with a visibility timeout of 10 minutes:
    a live worker answers its jobs within the default heartbeat TTL (5 s) and reclaim
    interval, once."""

    async def scenario() -> None:
        r = connect(redis_url)
        ids = await queued(r, model_name, 16)
        doomed = subprocess.Popen(
            [sys.executable, "-c", KILLED_WORKER, worker_url, model_name, tiny_bert],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert doomed.stdout is not None
            assert doomed.stdout.readline().strip() == "running"
        finally:
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait()
        pending = await r.xpending(jobs_key(model_name), GROUP)
        assert pending["pending"] > 0, "the kill came before anything was held"
        killed_at = time.monotonic()

        settings = ModelSettings(
            name=model_name, model_path=tiny_bert, torch_threads=1, dtype="fp32"
        )
        runner = EmbedRunner(settings)
        runner.load()
        # The defaults, but for the visibility timeout that is not to be waited out.
        live = await start(worker_url, "live", runner, {"visibility_timeout_s": 600})
        results = await all_stored(r, model_name, ids, timeout_s=60)
        took_s = time.monotonic() - killed_at
        await live.stop(10)

        assert {x["status"] for x in results} == {"ok"}
        assert live.stats.reclaimed == pending["pending"]
        # Heartbeat TTL 5 s, the live one's trust 5 s, reclaim every 5 s: about 15 s at most.
        assert took_s < 30, f"{took_s:.0f}s: the killed replica's jobs waited"
        await until(lambda: _pending_is_zero(r, model_name), what="nothing pending")
        await r.aclose()

    asyncio.run(scenario())


async def _pending_is_zero(r: Redis, model: str) -> bool:
    return int((await r.xpending(jobs_key(model), GROUP))["pending"]) == 0
