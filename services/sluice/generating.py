"""The model stage for continuous runners (generation): jobs join and leave between steps.

Where `running.ModelStage` runs one prepared batch per forward pass, this stage keeps the
model thread stepping a runner whose batch changes every step (runners/decoding.py). Between
steps it takes newly prepared batches from the same run queue (so the prep thread, the
backpressure and the lanes work as for any model), admitting them while fewer than a batch's
worth of jobs wait inside the runner. Each step's text deltas go to the writer as `Tokens`
(pushed to the jobs' `reply_to` streams), and each finished job as its one result, after its
last delta. A failing step fails (or retries) every job in flight, and the replica serves on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from sluice.batching import Batch
from sluice.errors import JobCancelled, JobExpired, classify
from sluice.protocol import Job, Result
from sluice.queue import Outcome
from sluice.runners.base import ContinuousRunner, Encoded, Progress
from sluice.running import ModelStage, Retry, RunItem, failed, outcome_of

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Tokens:
    """One step's text deltas for jobs that stream: (reply_to, job id, seq, text, attempt)."""

    deltas: list[tuple[str, str, int, str, int]]


StageItem = RunItem | Tokens


class ContinuousStage(ModelStage):
    """Owns the run queue and the model thread's step loop for a continuous runner."""

    def __init__(
        self,
        runner: ContinuousRunner,
        model: str,
        prefetch: int,
        emit: Callable[[StageItem], None],
        *,
        max_waiting: int,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(runner, model, prefetch, emit, on_batch=on_batch)
        self._send = emit
        self.crunner = runner
        self.max_waiting = max_waiting
        self.aborted = False
        self.cancelled = 0  # jobs dropped mid-generation because they were cancelled
        # Entry (lane, entry id) -> its job id and when it joined the runner: the jobs in
        # flight. By entry, not job id: the same id queued twice runs twice (runners/generate
        # .py). The model thread writes it; the event loop reads which ids are in flight, so
        # both hold the lock.
        self._admitted: dict[tuple[int, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._to_cancel: set[str] = set()

    def in_flight(self) -> list[str]:
        """The ids of the jobs waiting in or running through the runner; any thread."""
        with self._lock:
            return list({job_id for job_id, _ in self._admitted.values()})

    def cancel(self, job_ids: Collection[str]) -> None:
        """Drops these jobs before the next step (their results exist already: a cancel);
        any thread. Each gets an outcome, so its entry is acked with the stored result."""
        with self._lock:
            self._to_cancel.update(job_ids)

    def abort(self) -> None:
        self.aborted = True  # jobs in flight stay pending in Redis: reclaimed elsewhere
        super().abort()

    def run_forever(self) -> None:
        """Until `close` and the last job in flight is answered: take, admit, step."""
        ending = False
        while not self.aborted and not (ending and self.crunner.idle):
            if not ending:
                ending = self._take(block=self.crunner.idle)
            self._drop_cancelled()
            if not self.crunner.idle and not self.aborted:
                self._step()

    def _take(self, *, block: bool) -> bool:
        """Admits prepared batches while the runner has room; True once the end marker came."""
        while self.crunner.waiting < self.max_waiting:
            if block:
                found, batch = True, self._queue.get()
                block = False
            else:
                found, batch = self._queue.try_get()
            if not found:
                return False
            if batch is None:
                return True
            self._admit(batch)
        return False

    def _admit(self, batch: Batch) -> None:
        now_ms = time.time() * 1000
        live = [i for i in batch.items if not i.job.expired(now_ms)]
        late = [i.job for i in batch.items if i.job.expired(now_ms)]
        if late:
            expired = JobExpired("deadline passed before generation began")
            self._send([failed(self.model, job, expired) for job in late])
        with self._lock:
            for item in live:
                self._admitted[_entry(item.job)] = (item.job.id, now_ms)
        if live:
            self.crunner.admit(live)

    def _drop_cancelled(self) -> None:
        with self._lock:
            job_ids, self._to_cancel = self._to_cancel, set()
        if not job_ids:
            return
        items = self.crunner.cancel(job_ids)
        if not items:
            return  # finished (or never admitted) before the cancel was seen
        with self._lock:
            for item in items:
                self._admitted.pop(_entry(item.job), None)
        self.cancelled += len(items)
        log.info("dropped %d cancelled job(s) mid-generation", len(items))
        # "skipped", as a job pulled with its result there already: the stored result (the
        # cancel's) wins SET NX, the writer pushes it and acks, and none of it counts as a run
        # of this replica's, nor as a duplicate. The result here is stored only should the
        # cancel's have expired meanwhile.
        cancelled = JobCancelled("cancelled while it was generated")
        outcomes = [failed(self.model, item.job, cancelled) for item in items]
        self._send([replace(outcome, status="skipped") for outcome in outcomes])

    def _step(self) -> None:
        self._started_s = time.monotonic()
        self.busy = True
        try:
            progress = self.crunner.step()
        except Exception as exc:
            self._fail_in_flight(exc)
            return
        finally:
            self.busy = False
            self._timed(self._started_s)
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(progress), 0)  # a step's batch: the jobs it advanced
        deltas = [_delta(p) for p in progress if p.text and _streams(p.item.job)]
        if deltas:
            self._send(Tokens(deltas))
        done = [self._outcome(p) for p in progress if p.finished]
        self.jobs_run += len(done)
        if done:
            self._send(done)

    def _outcome(self, p: Progress) -> Outcome:
        job = p.item.job
        done_ms = time.time() * 1000
        with self._lock:
            _, admitted_ms = self._admitted.pop(_entry(job), (job.id, done_ms))
        own = p.timings or {}
        timings = {
            "queue_ms": round(job.pulled_ms - job.enqueued_ms, 3),
            "batch_wait_ms": round(admitted_ms - job.pulled_ms, 3),
            "compute_ms": round(done_ms - admitted_ms, 3),
            "total_ms": round(done_ms - job.enqueued_ms, 3),
            "batch_size": self.crunner.running + 1,
            "input_tokens": p.item.cost,
        }
        first_ms = own.get("first_token_ms")
        tokens = int(own.get("completion_tokens", 0))
        if first_ms is not None:
            timings["ttft_ms"] = round(first_ms - job.enqueued_ms, 3)
            if tokens > 1:
                timings["tpot_ms"] = round((done_ms - first_ms) / (tokens - 1), 3)
        result = Result(job.id, self.model, "ok", output=p.output, timings=timings)
        return outcome_of(job, result)

    def _fail_in_flight(self, exc: Exception) -> None:
        items: list[Encoded] = self.crunner.abandon()
        log.exception("generation step failed; %d job(s) in flight", len(items))
        err = classify(exc)
        for item in items:
            with self._lock:
                self._admitted.pop(_entry(item.job), None)
            out: StageItem = (
                Retry(item.job, err) if err.retryable else [failed(self.model, item.job, err)]
            )
            self._send(out)


def _entry(job: Job) -> tuple[int, str]:
    return job.lane, job.entry_id


def _streams(job: Job) -> bool:
    return job.reply_to is not None and job.params.get("stream", True) is not False


def _delta(p: Progress) -> tuple[str, str, int, str, int]:
    job = p.item.job
    assert job.reply_to is not None
    return (job.reply_to, job.id, p.seq, p.text, job.deliveries)
