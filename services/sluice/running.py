"""The model stage: one thread that runs prepared batches back to back.

The pull loop's prep thread puts collated batches into a small thread-safe queue; this thread
takes the next one the moment the last forward pass ends, with no trip through the event loop
in between (on a GPU a batch takes ~2 ms, so a hop of a millisecond would cost a third of the
throughput). What it produces goes to the writer through `emit`: raw outputs (`Ran`), which the
writer turns into result JSON on another thread, or ready outcomes: for jobs that failed or
expired, and for every batch when `encode_inline` (CPU models) says to encode them here.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sluice.batching import Batch
from sluice.errors import JobExpired, ModelFailure, SluiceError, classify
from sluice.protocol import PRIORITIES, BadEntry, Job, Result, error_result
from sluice.queue import Outcome
from sluice.runners.base import Encoded, Runner

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Ran:
    """A batch the model ran: its outputs, one per item, and when the forward pass ran."""

    batch: Batch
    outputs: list[Any]
    start_ms: float
    done_ms: float

    def outcomes(self, model: str) -> list[Outcome]:
        """The `ok` results, as the writer stores them (JSON encoding happens here).

        Byte for byte what `Result(...).to_json()` gives (a test holds them equal), built
        from one template a batch: this runs once per job, at up to tens of thousands a
        second, and a `Result` and its dict per job cost more than the JSON itself."""
        middle = b',"model":%b,"status":"ok","output":' % orjson.dumps(model)
        out = []
        for item, output in zip(self.batch.items, self.outputs, strict=True):
            job = item.job
            timings = self._timings(item)
            body = b'{"id":%b%b%b,"timings":%b}' % (
                orjson.dumps(job.id),
                middle,
                orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY),
                orjson.dumps(timings),
            )
            out.append(
                Outcome(
                    job.entry_id,
                    job.id,
                    body,
                    job.reply_to,
                    status="ok",
                    lane=job.lane,
                    enqueued_ms=float(job.enqueued_ms),
                    timings=timings,
                )
            )
        return out

    def _timings(self, item: Encoded) -> dict[str, float]:
        job = item.job
        return {
            "queue_ms": round(job.pulled_ms - job.enqueued_ms, 3),
            "batch_wait_ms": round(self.start_ms - job.pulled_ms, 3),
            "compute_ms": round(self.done_ms - self.start_ms, 3),
            "total_ms": round(self.done_ms - job.enqueued_ms, 3),
            "batch_size": len(self.batch.items),
            "input_tokens": item.cost,  # what the gateway reports as OpenAI `usage`
        }


@dataclass(slots=True)
class Retry:
    """A job that failed in a way that may pass (out of memory, a timeout): run it again."""

    job: Job
    error: SluiceError


RunItem = Ran | list[Outcome] | Retry


def outcome_of(job: Job | BadEntry, result: Result) -> Outcome:
    code = result.error["code"] if result.error else ""
    enqueued_ms = float(job.enqueued_ms) if isinstance(job, Job) else 0.0
    return Outcome(
        job.entry_id,
        result.id,
        result.to_json(),
        job.reply_to,
        result.status,
        job.lane,
        code,
        enqueued_ms,
        result.timings,
    )


def failed(model: str, job: Job, err: SluiceError) -> Outcome:
    return outcome_of(job, error_result(model, job.id, err))


class RunQueue:
    """Prepared batches waiting for the model, the most urgent lane first.

    Normal and low batches share `capacity` places; high batches have `capacity` places of
    their own, so a high batch never waits behind a full queue of normal ones (it runs next),
    and a flood of high jobs is bounded all the same.
    """

    _END = len(PRIORITIES)  # the close sentinel sorts after every batch

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._heap: list[tuple[int, int, Batch | None]] = []
        self._used = [0, 0]  # places taken: high, the rest
        self._seq = itertools.count()
        self._cond = threading.Condition()

    def put(self, batch: Batch | None, lane: int) -> None:
        kind = 0 if lane == 0 else 1
        with self._cond:
            while self._used[kind] >= self._capacity:
                self._cond.wait()
            heapq.heappush(self._heap, (lane, next(self._seq), batch))
            self._used[kind] += 1
            self._cond.notify_all()

    def get(self) -> Batch | None:
        with self._cond:
            while not self._heap:
                self._cond.wait()
            return self._pop()

    def try_get(self) -> tuple[bool, Batch | None]:
        """(False, None) when nothing waits; else (True, the batch or the end marker)."""
        with self._cond:
            return (True, self._pop()) if self._heap else (False, None)

    def _pop(self) -> Batch | None:
        lane, _, batch = heapq.heappop(self._heap)
        self._used[0 if lane <= 0 else 1] -= 1
        self._cond.notify_all()
        return batch

    def clear_and_end(self) -> None:
        """Drops what waits and puts an end marker first in line; never blocks."""
        with self._cond:
            self._heap = [(-1, next(self._seq), None)]
            self._used = [1, 0]
            self._cond.notify_all()


class ModelStage:
    """Owns the run queue and the loop of the model thread."""

    def __init__(
        self,
        runner: Runner,
        model: str,
        prefetch: int,
        emit: Callable[[RunItem], None],
        *,
        encode_inline: bool = False,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.on_batch = on_batch  # (jobs, padded tokens) of each batch run, for metrics
        self.encode_inline = encode_inline
        self.model = model
        self.busy = False
        self.batches = 0
        self._started_s = 0.0  # monotonic start of the batch running now
        self._forward_s = 0.0  # moving average of a forward pass's duration
        # Totals for the autoscaler's service rate: jobs answered per second of model time.
        self.jobs_run = 0
        self.busy_s = 0.0
        self._emit = emit
        self._queue = RunQueue(prefetch)

    def submit(self, batch: Batch) -> None:
        """Queues a prepared batch; blocks while `prefetch` batches of its kind wait
        (backpressure)."""
        self._queue.put(batch, batch.lane)

    def close(self) -> None:
        """Ends the loop after the batches already queued (blocks like `submit`)."""
        self._queue.put(None, RunQueue._END)

    def abort(self) -> None:
        """Drops what is queued and ends the loop now: for a stop that ran out of time (the
        dropped jobs stay pending in Redis and are reclaimed by another replica)."""
        self._queue.clear_and_end()

    def time_left_s(self) -> float:
        """How long the batch running now is expected to take still; 0 when idle."""
        if not self.busy:
            return 0.0
        return max(0.0, self._started_s + self._forward_s - time.monotonic())

    def _timed(self, started_s: float) -> None:
        took = time.monotonic() - started_s
        self.busy_s += took
        self._forward_s = took if self._forward_s == 0 else 0.8 * self._forward_s + 0.2 * took

    def run_forever(self) -> None:
        """The model thread's body: until `close`, run each batch and emit what it gives."""
        while (batch := self._queue.get()) is not None:
            try:
                items = self._run(batch)
            except Exception as exc:
                # Not even job by job (a collate or encode bug): fail the batch, keep serving.
                log.exception("batch of %d could not run", len(batch.items))
                err = ModelFailure(f"{type(exc).__name__}: {exc}")
                items = [[failed(self.model, i.job, err) for i in batch.items]]
            for item in items:
                self._emit(item)

    def _run(self, batch: Batch) -> list[RunItem]:
        now_ms = time.time() * 1000
        late = [i.job for i in batch.items if i.job.expired(now_ms)]
        out: list[RunItem] = []
        if late:
            expired = JobExpired("deadline passed before the batch ran")
            out.append([failed(self.model, job, expired) for job in late])
            live = [i for i in batch.items if not i.job.expired(now_ms)]
            if not live:
                return out
            batch = Batch(live, self.runner.collate(live))
        self._started_s = time.monotonic()
        self.busy = True
        try:
            out.extend(self._forward(batch))
        finally:
            self.busy = False
            self._timed(self._started_s)
        self.jobs_run += len(batch.items)
        return out

    def _forward(self, batch: Batch) -> list[RunItem]:
        """One forward pass; a failing batch is retried job by job so only the culprit fails."""
        start_ms = time.time() * 1000
        try:
            outputs = self.runner.finish(self.runner.run(batch.prepared), batch.items)
        except Exception as exc:
            if len(batch.items) == 1:
                job = batch.items[0].job
                log.exception("model failed on job %s", job.id)
                err = classify(exc)
                return [Retry(job, err) if err.retryable else [failed(self.model, job, err)]]
            log.exception("model failed on a batch of %d; retrying one by one", len(batch.items))
            return [
                result
                for item in batch.items
                for result in self._forward(Batch([item], self.runner.collate([item])))
            ]
        done_ms = time.time() * 1000
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(batch.items), batch.padded_tokens)
        log.debug(
            "batch of %d (%d padded tokens) in %.1f ms",
            len(batch.items),
            batch.padded_tokens,
            done_ms - start_ms,
        )
        ran = Ran(batch, outputs, start_ms, done_ms)
        # On a CPU the "spare" cores are the model's own: encoding results alongside the next
        # forward pass slows that pass more than encoding them first (BENCHMARKS.md).
        return [ran.outcomes(self.model) if self.encode_inline else ran]
