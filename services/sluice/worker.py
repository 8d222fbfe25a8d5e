"""One model's pipeline in one process: pull → admit → prepare → run → write.

Asyncio tasks and a model thread, joined by bounded queues, so each stage overlaps the
others:

    pull loop     priority pull (+ reclaim, trim) → decode → bad/expired/already answered
                  handled at once → encode + cut + collate in the prep thread (preparing.py)
                  → run queue
    model thread  forward passes back to back (running.py), or generation steps with jobs
                  joining and leaving between them (generating.py) → write queue
    write loop    result JSON in the finish thread → SET NX GET → push to reply_to → XACK
    lease loop    renews the leases of every entry held (XCLAIM JUSTID)
    heartbeat     says the replica is alive every second (heartbeat-1.lua)
    intake        tenants' inboxes → lanes (intake.py), woken by their submits' bell

While batch k runs on the model thread, batch k+1 is pulled and tokenized and the results of
batch k-1 are encoded and stored. The run queue holds `prefetch_batches` batches, so a replica
never pulls much more than it can run (backpressure). Ray-free on purpose: the Serve replica
wraps it, and benchmarks and tests can drive it bare.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from redis.exceptions import RedisError, ResponseError

from sluice.batching import Collector
from sluice.errors import DeadLettered, JobExpired
from sluice.generating import ContinuousStage, StageItem, Tokens
from sluice.intake import Intake
from sluice.metrics import Metrics
from sluice.preparing import Preparer, over_delivered, refuse
from sluice.protocol import BadEntry, Job, decode_job, error_result
from sluice.queue import Backoff, DeadLetter, Entry, Outcome, StreamQueue
from sluice.runners.base import ContinuousRunner, Runner
from sluice.running import ModelStage, Ran, Retry, outcome_of
from sluice.settings import ModelSettings, QueueSettings

log = logging.getLogger(__name__)

WriteItem = StageItem | list[DeadLetter]
# How often a generating replica looks for cancels of the jobs it is generating.
CANCEL_CHECK_S = 0.25


@dataclass
class WorkerStats:
    """Counters a replica reports (tests and `info()` read them)."""

    batches: int = 0
    ok: int = 0
    errors: int = 0
    expired: int = 0
    dead_letters: int = 0
    reclaimed: int = 0
    deleted_while_pending: int = 0  # recorded as dead letters by the reclaim script
    leases_renewed: int = 0
    leases_lost: int = 0  # entries another replica took over (this one froze past the timeout)
    duplicates: int = 0
    skipped: int = 0  # pulled with a final result already (cancelled, or a reused id)
    retries: int = 0
    trimmed: int = 0
    redis_errors: int = 0
    write_stalled_since: float | None = None  # monotonic; set while a write keeps failing
    tokens_pushed: int = 0  # streamed text deltas (generation)
    intake_moved: int = 0  # tenants' submits moved from their inboxes into the lanes
    cancelled_mid_run: int = 0  # generation jobs dropped from the running batch: cancelled
    started_at: float = field(default_factory=time.time)


class Worker:
    """Serves one model's stream until stopped."""

    def __init__(
        self,
        queue: StreamQueue,
        runner: Runner,
        model: ModelSettings,
        limits: QueueSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.metrics = metrics or Metrics()
        self.runner = runner
        self.model = model
        self.limits = limits
        self._stats = WorkerStats()
        self._collector = Collector(queue.pull, model, limits.block_ms)
        self._intake = Intake(queue.redis, model.name, limits)
        self._stage = self._model_stage()
        self._prepare = Preparer(runner, model, self._stage.submit)
        self._write_q: asyncio.Queue[WriteItem | None] = asyncio.Queue(8)
        # One thread each: prep (tokenize, collate), model (forward), finish (result JSON).
        # Separate, because prep blocks on a full run queue and must not hold up the writer.
        self._prep_pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-prep")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-model")
        self._finish_pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-finish")
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # groups created and the model registered, once
        self._retrying: set[asyncio.Task[None]] = set()
        self._next_reclaim = 0.0
        self._next_trim = 0.0
        self._tasks: dict[str, asyncio.Future[None]] = {}
        self._last_emit: concurrent.futures.Future[None] | None = None
        self._last_pull_ok = 0.0  # monotonic: the last pull Redis answered
        self._aborted = threading.Event()  # a stop that timed out: threads must not block

    def _model_stage(self) -> ModelStage:
        if isinstance(self.runner, ContinuousRunner):
            return ContinuousStage(
                self.runner,
                self.model.name,
                self.model.prefetch_batches,
                self._emit,
                max_waiting=self.model.max_batch_size,
                on_batch=self.metrics.batch,
            )
        return ModelStage(
            self.runner,
            self.model.name,
            self.model.prefetch_batches,
            self._emit,
            encode_inline=self.model.device == "cpu",
            on_batch=self.metrics.batch,
        )

    @property
    def stats(self) -> WorkerStats:
        """The counters so far (batches as the model thread counts them)."""
        self._stats.batches = self._stage.batches
        self._stats.intake_moved = self._intake.stats.moved
        if isinstance(self._stage, ContinuousStage):
            self._stats.cancelled_mid_run = self._stage.cancelled
        return self._stats

    def work_done(self) -> tuple[int, float]:
        """Jobs the model has answered and the seconds it spent on them (for autoscaling)."""
        return self._stage.jobs_run, self._stage.busy_s

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the loops (pull, write, lease, heartbeat, intake: owned tasks on the running
        event loop) and the model thread."""
        self._loop = asyncio.get_running_loop()
        self._own("pull", self._loop.create_task(self._pull_loop()))
        self._own("run", self._loop.run_in_executor(self._model_pool, self._stage.run_forever))
        self._own("write", self._loop.create_task(self._write_loop()))
        self._own("lease", self._loop.create_task(self._lease_loop()))
        self._own("heartbeat", self._loop.create_task(self._heartbeat_loop()))
        self._own("intake", self._loop.create_task(self._intake.run(self._stopping)))
        if isinstance(self._stage, ContinuousStage):
            self._own("cancels", self._loop.create_task(self._cancel_loop(self._stage)))

    def _own(self, name: str, future: asyncio.Future[None]) -> None:
        def on_done(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.error("the %s loop died", name, exc_info=fut.exception())

        future.add_done_callback(on_done)
        self._tasks[name] = future

    def check_health(self) -> None:
        """Raises if a loop has died, or if writes have kept failing for `write_stall_s` while
        Redis answers this replica's pulls (so the fault is this replica's): Serve then
        replaces it, and its entries, still pending, are reclaimed elsewhere. A Redis down
        for everyone is not this replica's fault: it keeps retrying."""
        for name, task in self._tasks.items():
            if task.done() and not self._stopping.is_set():
                exc = None if task.cancelled() else task.exception()
                raise RuntimeError(f"the {name} loop of {self.model.name} stopped: {exc!r}")
        since = self._stats.write_stalled_since
        if since is not None and self._last_pull_ok > since:
            stalled_s = time.monotonic() - since
            if stalled_s > self.limits.write_stall_s:
                raise RuntimeError(
                    f"writes of {self.model.name} have failed for {stalled_s:.0f}s while pulls "
                    f"succeed (write_stall_s {self.limits.write_stall_s})"
                )

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stops pulling, finishes the batches already pulled, writes their results.

        Each stage drains into the next before it is told to stop, so nothing pulled is left
        unanswered; past `timeout_s` the loops are cancelled and any entry still pending is
        handed back: the heartbeat ends with the stop, so another replica reclaims it at once.
        """
        self._stopping.set()
        for retry in self._retrying:
            retry.cancel()  # their entries stay pending: another replica reclaims them
        try:
            async with asyncio.timeout(timeout_s):
                # asyncio.wait, not await: a loop that already died must not abort the drain.
                await asyncio.wait([self._tasks["pull"]])
                await self._loop.run_in_executor(self._prep_pool, self._stage.close)
                await asyncio.wait([self._tasks["run"]])
                if self._last_emit is not None:
                    # The model thread's last hand-off must land before the writer's sentinel.
                    await asyncio.wrap_future(self._last_emit)
                await self._write_q.put(None)
                await asyncio.wait([self._tasks["write"]])
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("stop of %s was not clean: %r", self.model.name, exc)
        finally:
            self._aborted.set()
            self._stage.abort()  # unblocks the prep and model threads, so the process can exit
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            for pool in (self._prep_pool, self._model_pool, self._finish_pool):
                pool.shutdown(wait=False, cancel_futures=True)
        # After the loops: no renewal or heartbeat may come after it.
        try:
            async with asyncio.timeout(5.0):
                await self.queue.leave()
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning(
                "%s could not leave the group (%r): what it holds is reclaimed after "
                "heartbeat_ttl_s",
                self.model.name,
                exc,
            )
        log.info("worker for %s stopped: %s", self.model.name, self.stats)

    # -- pull ---------------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        backoff = Backoff()
        group_ready = False
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    # Again after every outage: a Redis restarted empty lost groups and library.
                    # The heartbeat first: entries pulled by a silent consumer may be taken.
                    await self.queue.heartbeat()
                    await self.queue.ensure_group()
                    await self.queue.register(self._registration())
                    group_ready = True
                    self.ready.set()
                entries = await self._collector.collect(self._stage.time_left_s)
                self._last_pull_ok = time.monotonic()
                backoff.reset()
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                log.warning("redis unavailable while pulling (%r); backing off", exc)
                group_ready = False
                await backoff.sleep()
                continue
            try:
                entries += await self._maybe_reclaim()
                await self._maybe_trim()
            except (RedisError, OSError) as exc:
                # What was pulled already still runs: dropping it would cost it a delivery.
                self.stats.redis_errors += 1
                log.warning("reclaim or trim failed (%r)", exc)
            if entries:
                await self._admit(entries)

    def _registration(self) -> dict[str, str | int | float]:
        return {
            "task": self.runner.task,
            "model_path": self.model.model_path,
            "registered_ms": int(time.time() * 1000),
        }

    async def _maybe_reclaim(self) -> list[Entry]:
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self.limits.reclaim_interval_s
        found = await self.queue.reclaim(self.model.max_batch_size)
        if found.errors:
            self.stats.redis_errors += len(found.errors)
            log.warning(
                "reclaim failed on %d lanes (%s); retried next pass",
                len(found.errors),
                found.errors[0],
            )
        self.stats.reclaimed += len(found.entries)
        self.stats.deleted_while_pending += len(found.deleted)
        self.metrics.reclaimed(len(found.entries))
        self.metrics.deleted_while_pending(len(found.deleted))
        return found.entries

    async def _maybe_trim(self) -> None:
        now = time.monotonic()
        if now >= self._next_trim:
            self._next_trim = now + self.limits.trim_interval_s
            self.stats.trimmed += await self.queue.trim()

    async def _lease_loop(self) -> None:
        """Renews the lease on every entry this replica holds, every `lease_interval_s`, for
        as long as it runs (through a stop's drain too): a job that runs for many visibility
        timeouts is never reclaimed from a live replica."""
        interval_s = self.limits.lease_interval_s or self.limits.visibility_timeout_s / 3
        wait_s = interval_s
        while True:
            await asyncio.sleep(wait_s)
            try:
                renewed = await self.queue.renew()
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                log.warning("could not renew leases (%r); retrying", exc)
                # Soon, not a whole interval later: two misses in a row must not add up to
                # the visibility timeout.
                wait_s = min(interval_s, 0.5)
                continue
            wait_s = interval_s
            self.stats.leases_renewed += renewed.renewed
            self.stats.leases_lost += len(renewed.taken)
            self.metrics.leases_lost(len(renewed.taken))

    async def _heartbeat_loop(self) -> None:
        """Says this replica is alive every `heartbeat_interval_s`, until it stops: once it is
        killed, other replicas take its entries within `heartbeat_ttl_s`, not a visibility
        timeout. An outage is logged once, when it starts (the pull loop logs it too)."""
        failing = False
        while True:
            try:
                await self.queue.heartbeat()
                failing = False
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                if not failing:
                    log.warning("could not send the heartbeat (%r); retrying", exc)
                failing = True
            await asyncio.sleep(self.limits.heartbeat_interval_s)

    async def _cancel_loop(self, stage: ContinuousStage) -> None:
        """Drops generation jobs cancelled while they run (a cancel stores their result) from
        the running batch within `CANCEL_CHECK_S`, so the model spends no more steps on text
        nobody reads (a gateway's client that hung up mid-stream). One MGET of the in-flight
        jobs' result keys a tick: O(batch), whatever the queue holds."""
        wait_s = CANCEL_CHECK_S
        while True:
            await asyncio.sleep(wait_s)
            wait_s = CANCEL_CHECK_S
            job_ids = stage.in_flight()
            if not job_ids:
                continue
            try:
                stored = await self.queue.existing_results(job_ids)
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                log.warning("could not check for cancelled jobs (%r); retrying in 5 s", exc)
                wait_s = 5.0  # an outage (or a wrong ACL) logs now and then, not 4 times a second
                continue
            answered = [i for i, raw in zip(job_ids, stored, strict=True) if raw is not None]
            if answered:
                stage.cancel(answered)

    async def _admit(self, entries: Sequence[Entry]) -> None:
        """Answers what cannot run (bad, expired, over-delivered); sends the rest on."""
        self.metrics.pulled(len(entries))
        jobs: list[Job] = []
        answers: list[Outcome] = []
        letters: list[DeadLetter] = []
        for entry in entries:
            decoded = decode_job(
                entry.entry_id,
                entry.fields,
                self.limits,
                entry.deliveries,
                entry.lane,
                entry.repeated,
            )
            if entry.deliveries > self.limits.max_deliveries:
                letters.append(
                    over_delivered(self.model.name, self.limits.max_deliveries, entry, decoded)
                )
            elif isinstance(decoded, BadEntry):
                refuse(self.model.name, decoded, answers, letters)
            elif decoded.expired():
                answers.append(
                    outcome_of(
                        decoded,
                        error_result(self.model.name, decoded.id, JobExpired("deadline passed")),
                    )
                )
            else:
                jobs.append(decoded)
        jobs = await self._skip_answered(jobs, answers)
        await self._send(answers)
        await self._send(letters)
        if jobs:
            refused = await self._loop.run_in_executor(self._prep_pool, self._prepare, jobs)
            await self._send(refused)

    async def _skip_answered(self, jobs: list[Job], answers: list[Outcome]) -> list[Job]:
        """Jobs whose id has a final result already (cancelled while queued, or the same id
        queued twice) are not run: their entry is acked and their reply_to gets that result."""
        try:
            stored = await self.queue.existing_results([job.id for job in jobs])
        except (RedisError, OSError) as exc:
            # Run them: SET NX still keeps the first result, so this costs compute, not safety.
            log.warning("could not look for existing results (%r)", exc)
            return jobs
        live = []
        for job, value in zip(jobs, stored, strict=True):
            if value is None:
                live.append(job)
                continue
            self.stats.skipped += 1
            answers.append(Outcome(job.entry_id, job.id, value, job.reply_to, "skipped", job.lane))
        return live

    # -- run ----------------------------------------------------------------------------------

    def _emit(self, item: StageItem) -> None:
        """Model thread: hands a result to the writer without waiting for the event loop,
        but blocks while an earlier hand-off still waits for room (bounded memory)."""
        while self._last_emit is not None and not self._aborted.is_set():
            try:
                self._last_emit.result(timeout=1.0)
                break
            except concurrent.futures.TimeoutError:
                continue
        self._last_emit = asyncio.run_coroutine_threadsafe(self._write_q.put(item), self._loop)

    # -- write --------------------------------------------------------------------------------

    async def _send(self, items: WriteItem) -> None:
        if items:
            await self._write_q.put(items)

    async def _write_loop(self) -> None:
        while (item := await self._write_q.get()) is not None:
            if isinstance(item, Retry):
                await self._retry(item)
                continue
            if isinstance(item, Tokens):
                await self._push_tokens(item)
                continue
            if isinstance(item, Ran):
                item = await self._loop.run_in_executor(
                    self._finish_pool, item.outcomes, self.model.name
                )
            await self._write_until_done(item)

    async def _push_tokens(self, item: Tokens) -> None:
        try:
            self.stats.tokens_pushed += await self.queue.push_tokens(item.deltas)
        except (RedisError, OSError) as exc:
            # Deltas are progress only; the final result is written (and retried) as usual.
            self.stats.redis_errors += 1
            log.warning("dropped %d streamed deltas (%r)", len(item.deltas), exc)

    async def _retry(self, item: Retry) -> None:
        """A retryable failure runs again after a backoff, up to `max_deliveries` runs in
        all; then the job is dead-lettered with the last error as its reason."""
        job, err = item.job, item.error
        if job.deliveries >= self.limits.max_deliveries:
            # The message quotes the exception, which can be any size: the result stays small.
            reason = (
                f"{err.code}: {err.message[:512]} (failed {job.deliveries} times, "
                f"max_deliveries {self.limits.max_deliveries})"
            )
            res = error_result(self.model.name, job.id, DeadLettered(reason))
            letter = DeadLetter(
                job.entry_id, job.fields, reason, job.deliveries, outcome_of(job, res), job.lane
            )
            await self._write_until_done([letter])
            return
        if self._stopping.is_set():
            return  # left pending: reclaimed elsewhere, its delivery count intact
        task = self._loop.create_task(self._run_again(job))
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

    async def _run_again(self, job: Job) -> None:
        cap = self.limits.visibility_timeout_s / 2
        delay = min(self.limits.retry_backoff_s * 2 ** (job.deliveries - 1), cap)
        await asyncio.sleep(delay * random.uniform(0.8, 1.0))
        try:
            # Count this run in Redis too: a crash now must not reset the count.
            if not await self.queue.keep(job.lane, job.entry_id, job.deliveries + 1):
                return  # answered meanwhile, or taken over by another replica
            (stored,) = await self.queue.existing_results([job.id])
        except (RedisError, OSError) as exc:
            log.warning("could not keep %s for a retry (%r): left for reclaim", job.id, exc)
            self.queue.release([job])
            return
        if stored is not None:
            # Cancelled (or answered elsewhere) during the backoff: that result is the one.
            self.stats.skipped += 1
            await self._send(
                [Outcome(job.entry_id, job.id, stored, job.reply_to, "skipped", job.lane)]
            )
            return
        if job.expired():
            # Its deadline passed during the backoff: it ends `expired`, not run again.
            err = JobExpired("deadline passed while waiting to be retried")
            await self._send([outcome_of(job, error_result(self.model.name, job.id, err))])
            return
        job.deliveries += 1
        self.stats.retries += 1
        self.metrics.retried()
        refused = await self._loop.run_in_executor(self._prep_pool, self._prepare, [job])
        await self._send(refused)

    async def _write_until_done(self, item: list[Outcome] | list[DeadLetter]) -> None:
        """Retries through outages (results wait in memory; every write is idempotent and
        O(batch), so a retry costs what the first attempt did). A write Redis keeps refusing
        (WRONGTYPE, READONLY...) is given up after a few tries: its entries are handed back
        (left pending, no longer renewed) and reclaimed later, never lost."""
        backoff, refusals = Backoff(), 0
        while True:
            try:
                await self._write(item)
                self._stats.write_stalled_since = None
                return
            except ResponseError as exc:
                refusals += 1
                self._write_failed()
                if refusals >= 3:
                    log.error(
                        "redis refused a write %d times (%r); %d entries handed back",
                        refusals,
                        exc,
                        len(item),
                    )
                    self.queue.release(item)
                    return
                await backoff.sleep()
            except (RedisError, OSError) as exc:
                self._write_failed()
                log.warning("redis unavailable while writing (%r); retrying", exc)
                await backoff.sleep()

    def _write_failed(self) -> None:
        self.stats.redis_errors += 1
        self.metrics.write_failed()
        if self._stats.write_stalled_since is None:
            self._stats.write_stalled_since = time.monotonic()

    async def _write(self, item: list[Outcome] | list[DeadLetter]) -> None:
        if item and isinstance(item[0], DeadLetter):
            letters = [d for d in item if isinstance(d, DeadLetter)]
            done = await self.queue.dead_letter(letters)
            self.stats.dead_letters += done
            self.metrics.dead_lettered(done)
            return
        outcomes = [o for o in item if isinstance(o, Outcome)]
        won = await self.queue.finish(outcomes)
        # A skipped job was answered before it ran (cancelled, or its id reused): neither a
        # result of this replica's nor a duplicate run.
        ran = [(o, w) for o, w in zip(outcomes, won, strict=True) if o.status != "skipped"]
        stored = sum(1 for _, w in ran if w)
        self.metrics.finished(outcomes, stored + len(outcomes) - len(ran), time.time() * 1000)
        self.stats.duplicates += len(ran) - stored
        for o, _ in ran:
            if o.status == "ok":
                self.stats.ok += 1
            elif o.status == "expired":
                self.stats.expired += 1
            else:
                self.stats.errors += 1
