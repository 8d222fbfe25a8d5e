"""Driving a target: open loop at scheduled times, closed loop with N clients, rate sweeps.

**Open loop, free of coordinated omission.** The schedule (arrivals.py) is fixed before the
run. A sender thread sleeps until each job's due time and sends it; when it wakes late (the
target's `send` was slow, the GIL, the scheduler), it sends everything already due at once, in
groups of up to `max_group`, and counts how late each job went out. It never waits for an
answer. A collector thread polls the target for answers and samples its queue depth. A job's
latency runs from its *due* time to its answer (`Completion.done_s`), so a slow sender or a
slow system shows up in the latencies instead of quietly lowering the offered load.

**Closed loop.** N virtual clients each send one job, wait for its answer, and send the next:
the system's throughput ceiling at that concurrency. Latency runs from the actual send.

**Warm-up.** The first `warmup_s` of a run is sent and answered like the rest but left out of
the statistics (stats.py): jobs due before it end count for nothing, and throughput counts
only answers inside the measured window.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from loadtest.corpus import sentences
from loadtest.target import Completion, Target

DEPTH_EVERY_S = 0.25
POLL_S = 0.05
TEXT_POOL = 5000


@dataclass(slots=True)
class JobRecord:
    """One job as the harness saw it. Times are Unix seconds."""

    due_s: float
    sent_s: float = math.nan
    done_s: float | None = None
    status: str | None = None  # None: no answer (yet)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        return None if self.done_s is None else 1000 * (self.done_s - self.due_s)


@dataclass(slots=True)
class RunRecord:
    """Everything one run produced, raw; stats.py turns it into figures."""

    target: str
    mode: str  # "open" or "closed"
    start_s: float  # Unix time of offset 0
    warmup_s: float
    duration_s: float  # the measured window, after the warm-up
    offered_rate: float | None = None  # open loop: the schedule's mean rate
    concurrency: int | None = None  # closed loop
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    depth: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, jobs)
    send_lag_s: list[float] = field(default_factory=list)  # per job: how late it went out
    drained: bool = True  # every sent job answered before the drain timeout

    @property
    def window(self) -> tuple[float, float]:
        begin = self.start_s + self.warmup_s
        return begin, begin + self.duration_s


class _Collector(threading.Thread):
    """Polls the target for answers and samples its queue depth until told to stop."""

    def __init__(
        self, target: Target, run: RunRecord, bar: tqdm[Any], on_done: Callable[[str], None]
    ) -> None:
        super().__init__(name="collector", daemon=True)
        self.target, self.run_record, self.bar, self.on_done = target, run, bar, on_done
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.answered = 0

    def run(self) -> None:
        next_depth = 0.0
        try:
            while not self.stop.is_set():
                self._take(self.target.poll(POLL_S))
                now = time.monotonic()
                if now >= next_depth:
                    next_depth = now + DEPTH_EVERY_S
                    depth = self.target.queue_depth()
                    if depth is not None:
                        t = time.time() - self.run_record.start_s
                        self.run_record.depth.append((t, depth))
                        self.bar.set_postfix(depth=depth, refresh=False)
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc

    def _take(self, done: list[Completion]) -> None:
        for c in done:
            rec = self.run_record.jobs.get(c.job_id)
            if rec is None or rec.status is not None:
                continue  # not ours (a probe), or answered already
            rec.done_s, rec.status, rec.timings = c.done_s, c.status, c.timings
            self.answered += 1
            self.bar.update(1)
            self.on_done(c.job_id)


def _texts(n: int) -> list[str]:
    return sentences(min(max(n, 1), TEXT_POOL), seed=4321)


def _send(target: Target, run: RunRecord, group: list[tuple[str, str, float]]) -> list[str]:
    """Sends (id, text, due) triples; refused ids are answered `rejected` at once."""
    now = time.time()
    for job_id, _, due in group:
        run.jobs[job_id] = JobRecord(due_s=due, sent_s=now)
        run.send_lag_s.append(max(0.0, now - due))
    refused = target.send([(job_id, text) for job_id, text, _ in group])
    for job_id in refused:
        rec = run.jobs[job_id]
        rec.status, rec.done_s = "rejected", time.time()
    return refused


def _drain(run: RunRecord, collector: _Collector, timeout_s: float, bar: tqdm[Any]) -> None:
    bar.set_description(f"{run.target}: draining")
    deadline = time.monotonic() + timeout_s
    while collector.is_alive() and time.monotonic() < deadline:
        if all(rec.status is not None for rec in list(run.jobs.values())):
            break
        time.sleep(0.05)
    run.drained = all(rec.status is not None for rec in list(run.jobs.values()))


def _finish(collector: _Collector) -> None:
    collector.stop.set()
    collector.join(10)
    if collector.error is not None:
        raise RuntimeError(f"collector failed: {collector.error!r}") from collector.error


def run_open(
    target: Target,
    offsets: Sequence[float],
    *,
    warmup_s: float,
    duration_s: float,
    drain_timeout_s: float = 60.0,
    max_group: int = 64,
    progress: bool = True,
    label: str = "",
) -> RunRecord:
    """Sends one job at each offset (seconds from start, sorted), whatever the answers do."""
    tag = uuid.uuid4().hex[:8]
    texts = _texts(len(offsets))
    lead_s = 0.2  # a moment to start the threads before the first due time
    start_mono, start_s = time.monotonic() + lead_s, time.time() + lead_s
    run = RunRecord(target.name, "open", start_s, warmup_s, duration_s)
    in_window = sum(1 for t in offsets if warmup_s <= t < warmup_s + duration_s)
    run.offered_rate = in_window / duration_s
    bar = tqdm(total=len(offsets), unit="job", dynamic_ncols=True, disable=not progress)
    bar.set_description(f"{target.name} {label}".strip())
    collector = _Collector(target, run, bar, lambda _: None)
    collector.start()
    try:
        i, n = 0, len(offsets)
        while i < n and collector.error is None:
            wait = start_mono + offsets[i] - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                continue
            now = time.monotonic() - start_mono
            j = i + 1
            while j < n and j - i < max_group and offsets[j] <= now:
                j += 1
            group = [
                (f"{tag}-{k}", texts[k % len(texts)], start_s + offsets[k]) for k in range(i, j)
            ]
            refused = _send(target, run, group)
            bar.update(len(refused))
            i = j
        _drain(run, collector, drain_timeout_s, bar)
    finally:
        _finish(collector)
        bar.close()
    return run


def run_closed(
    target: Target,
    concurrency: int,
    *,
    warmup_s: float,
    duration_s: float,
    drain_timeout_s: float = 60.0,
    progress: bool = True,
    label: str = "",
) -> RunRecord:
    """N clients, each sending its next job when its last one is answered (or refused)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    tag, texts = uuid.uuid4().hex[:8], _texts(TEXT_POOL)
    start_s, end_mono = time.time(), time.monotonic() + warmup_s + duration_s
    run = RunRecord(target.name, "closed", start_s, warmup_s, duration_s)
    run.concurrency = concurrency
    freed: queue.SimpleQueue[str] = queue.SimpleQueue()
    bar = tqdm(unit="job", dynamic_ncols=True, disable=not progress)
    bar.set_description(f"{target.name} {label}".strip())
    collector = _Collector(target, run, bar, freed.put)
    collector.start()
    counter = iter(range(1 << 62))

    def send_one() -> None:
        k = next(counter)
        for job_id in _send(target, run, [(f"{tag}-{k}", texts[k % len(texts)], time.time())]):
            bar.update(1)
            time.sleep(0.01)  # a refused client backs off a little before its next try
            freed.put(job_id)

    try:
        for _ in range(concurrency):
            send_one()
        while time.monotonic() < end_mono and collector.error is None:
            try:
                freed.get(timeout=0.1)
            except queue.Empty:
                continue
            send_one()
        _drain(run, collector, drain_timeout_s, bar)
    finally:
        _finish(collector)
        bar.close()
    return run
