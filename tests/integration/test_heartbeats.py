"""Heartbeats: the entries of a replica killed outright are taken within seconds, not a
visibility timeout later; a live replica's never are, nor anyone's after something lapsed
every heartbeat at once (an outage, a Redis stall, a restart from an older snapshot), nor
those of a replica of an earlier release, which sets no heartbeat; and silence alone never
dead-letters an entry deleted under a replica that will still answer it.

Issue 19: `serve run` stopped by SIGTERM kills its replicas outright (Ray's driver exits and
takes the cluster with it), and the jobs they held waited a whole visibility timeout (60 s)
for the next replica. Real redis-server, the worker's own ACL user, queues driven bare with a
fast heartbeat (0.05 s, TTL 0.3 s); the last test kills a real worker process with SIGKILL
and uses the defaults. The red-team findings it answers: a job both answered and
dead-lettered; a Redis stall or a quick restart taking a live replica's entries; a rolling
upgrade taking an old replica's entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from sluice.protocol import GROUP, alive_key, dead_key, jobs_key
from sluice.queue import StreamQueue, connect
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.stack import RedisServer
from tests.acl_docs import WORKER
from tests.conftest import PASSWORDS
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


async def owners(r: Redis, model: str) -> dict[str, str]:
    pending = await r.xpending_range(jobs_key(model), GROUP, "-", "+", 100)
    return {p["message_id"].decode(): p["consumer"].decode() for p in pending}


async def closed(*queues: StreamQueue) -> None:
    for queue in queues:
        await queue.redis.aclose()


@dataclass
class OwnRedis:
    """A redis-server of the test's own (it is stopped and restarted), an admin connection to
    it, a live replica's queue holding 3 entries, and a reclaimer's queue."""

    server: RedisServer
    admin: Redis
    live: StreamQueue
    reclaimer: StreamQueue

    async def restart(self, down_until: float = 0.0) -> None:
        """A crash, then a restart from the last snapshot (once `down_until`, monotonic, has
        passed); the admin connects again."""
        assert self.server.proc is not None
        self.server.proc.kill()
        self.server.proc.wait()
        await asyncio.sleep(max(0.0, down_until - time.monotonic()))
        self.server.start()
        await self.admin.aclose()
        self.admin = connect(self.server.url)


@contextlib.asynccontextmanager
async def own_redis(
    acl_lines: list[str], model: str, limits: QueueSettings
) -> AsyncIterator[OwnRedis]:
    server = RedisServer(acl_lines=acl_lines).start()
    try:
        url = server.url_for(WORKER, PASSWORDS[WORKER])
        setup = OwnRedis(
            server,
            connect(server.url),
            StreamQueue(connect(url), model, "live", limits),
            StreamQueue(connect(url), model, "reclaimer", limits),
        )
        await queued(setup.admin, model, 3)
        await setup.live.heartbeat()
        assert len(await setup.live.pull(3, None)) == 3
        yield setup
        await closed(setup.live, setup.reclaimer)
        await setup.admin.aclose()
    finally:
        server.cleanup()


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
        # Not yet: the reclaimer's own heartbeat has not beaten for a whole TTL, so it cannot
        # tell a dead consumer from one whose heartbeat an outage interrupted.
        assert not (await reclaimer.reclaim(100)).entries

        await beat_for(TTL_S * 1.5, beating, reclaimer)
        found = await reclaimer.reclaim(100)

        assert {e.entry_id for e in found.entries} == held_by_killed
        assert {e.deliveries for e in found.entries} == {2}  # a delivery, counted
        assert await owners(r, model_name) == {
            **dict.fromkeys(held_by_beating, beating.consumer),
            **dict.fromkeys(held_by_killed, reclaimer.consumer),
        }
        await closed(beating, killed, reclaimer)
        await r.aclose()

    asyncio.run(scenario())


def test_after_every_heartbeat_lapsed_at_once_nothing_is_taken_for_a_ttl(
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

        await asyncio.sleep(TTL_S * 1.5)  # the outage: nobody's heartbeat lands
        assert await reclaimer.heartbeat() == 0  # a run of beats starts again
        assert not (await reclaimer.reclaim(100)).entries, "took a live one's entries"
        await beat_for(TTL_S * 1.5, other, reclaimer)
        assert not (await reclaimer.reclaim(100)).entries, "took a live one's entries"
        await closed(other, reclaimer)
        await r.aclose()

    asyncio.run(scenario())


def test_a_redis_stall_or_a_restart_from_an_older_snapshot_takes_no_live_entries(
    acl_lines, model_name
):
    """Expiry runs on Redis's clock. A stall (a slow command, a fork, a VM pause; SIGSTOP
    here) longer than the TTL fails no call: the reclaim queued during it runs first when Redis
    resumes, and finds every heartbeat expired. A restart that loads an older snapshot finds
    them expired too. Neither may take the entries of a replica about to beat again."""

    async def scenario() -> None:
        async with own_redis(acl_lines, model_name, LIMITS) as own:
            live, reclaimer = own.live, own.reclaimer
            await beat_for(TTL_S * 1.5, live, reclaimer)

            assert own.server.proc is not None
            os.kill(own.server.proc.pid, signal.SIGSTOP)
            try:
                reclaim = asyncio.create_task(reclaimer.reclaim(100))
                await asyncio.sleep(0.1)
                beat = asyncio.create_task(live.heartbeat())  # the live one's next beat
                await asyncio.sleep(TTL_S * 3)
            finally:
                os.kill(own.server.proc.pid, signal.SIGCONT)
            assert not (await reclaim).entries, "a Redis stall took a live replica's entries"
            await beat

            await own.admin.save()  # the snapshot, with both heartbeats in it
            await beat_for(TTL_S * 1.5, live, reclaimer)
            await own.restart()
            assert await own.admin.exists(alive_key(model_name, live.consumer)) == 0
            # Twice: the first pass may lose a lane to the connection the restart cut.
            for _ in range(2):
                found = await reclaimer.reclaim(100)
                assert not found.entries, "a quick restart took a live replica's entries"

    asyncio.run(scenario())


def test_a_replica_of_an_earlier_release_keeps_what_it_pulls(redis_url, worker_url, model_name):
    """A rolling upgrade: a replica of the release before heartbeats sets its alive key only
    as it renews its leases, and its name has no mark; it loses nothing to a new one."""

    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 3)
        await r.xreadgroup(GROUP, "host-123-abcdef", {jobs_key(model_name): ">"}, count=3)
        new = StreamQueue(connect(worker_url), model_name, "new", LIMITS)
        await beat_for(TTL_S * 1.5, new)
        assert not (await new.reclaim(100)).entries, "took an old replica's fresh entries"
        await closed(new)
        await r.aclose()

    asyncio.run(scenario())


def test_silence_alone_never_dead_letters_an_entry_its_replica_will_still_answer(
    redis_url, worker_url, model_name
):
    """A replica holds a job whose entry is deleted under it (an XDEL, a trim), then its link
    stalls past the heartbeat TTL (no error: under the socket timeout). The job is still its
    to answer by id: a reclaimer records no dead letter for it (the job would end twice)."""

    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 1)
        holder = StreamQueue(connect(worker_url), model_name, "holder", LIMITS)
        reclaimer = StreamQueue(connect(worker_url), model_name, "reclaimer", LIMITS)
        await holder.heartbeat()
        (entry,) = await holder.pull(1, None)
        await r.xdel(jobs_key(model_name), entry.entry_id)

        await beat_for(TTL_S * 2, reclaimer)  # the holder is silent all along
        found = await reclaimer.reclaim(100)

        assert not found.entries and not found.deleted
        assert await r.xlen(dead_key(model_name)) == 0
        assert await owners(r, model_name) == {entry.entry_id: holder.consumer}
        await closed(holder, reclaimer)
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
        await leaving.heartbeat()  # a late beat (a loop not yet cancelled) sets nothing
        assert await r.exists(alive_key(model_name, leaving.consumer)) == 0
        found = await reclaimer.reclaim(100)

        assert {e.entry_id for e in found.entries} == held
        await closed(leaving, reclaimer)
        await r.aclose()

    asyncio.run(scenario())


async def retrying(call: Any) -> Any:
    """A call through a connection a restart cut: redis-py reconnects on the next try."""
    for _ in range(50):
        try:
            return await call()
        except (redis.ConnectionError, OSError):
            await asyncio.sleep(0.02)
    return await call()


def test_a_restart_that_lapses_a_live_heartbeat_but_not_the_reclaimers_takes_nothing(
    acl_lines, model_name
):
    """Two replicas beat a fraction of an interval apart. Redis restarts from a snapshot whose
    age and downtime fall between their expiries: the live replica's key is gone, the
    reclaimer's is still there. The time Redis lost breaks the reclaimer's run too (its key's
    PTTL shows the gap), so it takes nothing before the live one beats again."""
    limits = QueueSettings(visibility_timeout_s=600, heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)

    async def scenario() -> None:
        async with own_redis(acl_lines, model_name, limits) as own:
            live, reclaimer = own.live, own.reclaimer
            live_beat = time.monotonic()
            for _ in range(4):  # both beat once a second, 0.8 s apart
                await live.heartbeat()
                live_beat = time.monotonic()
                await asyncio.sleep(0.8)
                await reclaimer.heartbeat()
                await asyncio.sleep(0.2)
            await own.admin.save()  # live's key expires 0.8 s before the reclaimer's
            await own.restart(down_until=live_beat + 3.0 + 0.15)
            assert await own.admin.exists(alive_key(model_name, live.consumer)) == 0
            assert await own.admin.exists(alive_key(model_name, reclaimer.consumer)) == 1
            found = await retrying(lambda: reclaimer.reclaim(100))
            assert not found.entries, "a restart took a live replica's entries (before a beat)"
            assert await retrying(reclaimer.heartbeat) == 0  # its run starts again
            found = await retrying(lambda: reclaimer.reclaim(100))
            assert not found.entries, "a restart took a live replica's entries (after a beat)"

    asyncio.run(scenario())


def test_a_burst_of_beats_is_no_run(redis_url, worker_url, model_name):
    """Beats that land together (two queues of one consumer, a reconnect's beat beside the
    loop's, beats queued during a stall) add no time to a run: trust takes a whole TTL."""

    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 2)
        victim = StreamQueue(connect(worker_url), model_name, "victim", LIMITS)
        await victim.heartbeat()
        assert len(await victim.pull(2, None)) == 2
        await r.delete(alive_key(model_name, victim.consumer))  # lapsed just now
        reclaimer = StreamQueue(connect(worker_url), model_name, "reclaimer", LIMITS)
        runs = await asyncio.gather(*(reclaimer.heartbeat() for _ in range(30)))
        assert max(runs) < TTL_S * 1000 / 2
        assert not (await reclaimer.reclaim(100)).entries, "trusted after a burst of beats"
        await closed(victim, reclaimer)
        await r.aclose()

    asyncio.run(scenario())


def test_a_worker_trusts_a_ttl_after_it_connects_not_sooner(
    redis_url, worker_url, model_name, tiny_bert
):
    """A real Worker, with the smallest TTL allowed (3 intervals): its pull loop beats as it
    connects, beside its heartbeat loop. After something lapsed every heartbeat at once, a live
    replica whose next beat lands within the TTL keeps its entries."""
    interval_s, ttl_s = 0.5, 1.5
    queue = {
        "visibility_timeout_s": 600,
        "heartbeat_interval_s": interval_s,
        "heartbeat_ttl_s": ttl_s,
    }

    async def scenario() -> None:
        r = connect(redis_url)
        await queued(r, model_name, 3)
        live = StreamQueue(connect(worker_url), model_name, "live", QueueSettings(**queue))
        await live.heartbeat()
        held = {e.entry_id for e in await live.pull(3, None)}
        runner = EmbedRunner(
            ModelSettings(name=model_name, model_path=tiny_bert, torch_threads=1, dtype="fp32")
        )
        runner.load()
        await r.delete(alive_key(model_name, live.consumer))  # every heartbeat lapsed
        lapsed = time.monotonic()
        worker = await start(worker_url, "reclaimer", runner, {**queue, "reclaim_interval_s": 0.05})
        try:
            while time.monotonic() < lapsed + 0.8 * ttl_s:
                assert await owners(r, model_name) == dict.fromkeys(held, live.consumer), (
                    f"taken {time.monotonic() - lapsed:.2f}s after the lapse (TTL {ttl_s}s)"
                )
                await asyncio.sleep(0.02)
        finally:
            await worker.stop(5)
            await closed(live)
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
    a worker started after it answers its jobs, once, within its own TTL of beats, the dead
    one's lapse (both 15 s by default, side by side) and a reclaim pass (5 s)."""

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
        assert took_s < 45, f"{took_s:.0f}s: the killed replica's jobs waited"
        await until(lambda: _pending_is_zero(r, model_name), what="nothing pending")
        await r.aclose()

    asyncio.run(scenario())


async def _pending_is_zero(r: Redis, model: str) -> bool:
    return int((await r.xpending(jobs_key(model), GROUP))["pending"]) == 0
