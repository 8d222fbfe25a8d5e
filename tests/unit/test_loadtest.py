"""The load generator's pure parts: arrival schedules and what the statistics count."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from loadtest import arrivals
from loadtest.cli import parse, saturate
from loadtest.openloop import JobRecord, RunRecord
from loadtest.stats import summarize
from loadtest.target import Completion, Target


def test_poisson_and_gamma_keep_the_mean_rate_and_gamma_is_burstier():
    poisson = arrivals.poisson(200, 50, seed=1)
    bursty = arrivals.gamma(200, 0.25, 50, seed=1)
    for offsets in (poisson, bursty):
        assert offsets == sorted(offsets) and 0 <= offsets[0] and offsets[-1] < 50
        assert len(offsets) / 50 == pytest.approx(200, rel=0.1)
    cv = [float(np.std(np.diff(x)) / np.mean(np.diff(x))) for x in (poisson, bursty)]
    assert cv[0] == pytest.approx(1, abs=0.1)  # exponential gaps
    assert cv[1] == pytest.approx(2, abs=0.3)  # gamma shape k: CV = 1 / sqrt(k)
    assert arrivals.poisson(200, 5, seed=3) == arrivals.poisson(200, 5, seed=3)


def test_constant_ramp_and_trace(tmp_path):
    assert arrivals.constant(4, 1) == [0, 0.25, 0.5, 0.75]
    ramp = arrivals.ramp(10, 190, 20, seed=2)
    first, last = (sum(1 for t in ramp if lo <= t < lo + 5) for lo in (0, 15))
    assert len(ramp) == pytest.approx(2000, rel=0.1) and last > 3 * first
    (tmp_path / "t.json").write_text(json.dumps({"offsets": [5, 3.5, 4]}))
    (tmp_path / "t.csv").write_text("offset_s\n1\n1.5\n")
    assert arrivals.trace(tmp_path / "t.json") == [0, 0.5, 1.5]
    assert arrivals.trace(tmp_path / "t.csv") == [0, 0.5]
    with pytest.raises(ValueError, match="burstiness"):
        arrivals.gamma(10, 0, 1)


def test_stats_leave_out_the_warm_up_and_count_goodput_by_answer_time():
    run = RunRecord("t", "open", start_s=1000.0, warmup_s=1.0, duration_s=2.0, offered_rate=4)
    jobs = {
        "warm": JobRecord(1000.9, 1000.9, 1001.2, "ok", {"batch_size": 2}),  # due in warm-up
        "fast": JobRecord(1001.0, 1001.0, 1001.1, "ok", {"batch_size": 2, "compute_ms": 5}),
        "slow": JobRecord(1001.5, 1001.5, 1002.9, "ok", {"batch_size": 4}),  # over the SLO
        "late": JobRecord(1002.5, 1002.5, 1003.5, "ok", {"batch_size": 4}),  # after window
        "bad": JobRecord(1002.0, 1002.0, 1002.1, "invalid_input"),
        "refused": JobRecord(1002.0, 1002.0, 1002.0, "rejected"),
        "lost": JobRecord(1002.2, 1002.2),
    }
    run.jobs.update(jobs)
    run.send_lag_s = [0.0, 0.002, 0.02]
    s = summarize(run, slo_ms=500)
    assert s["jobs"]["measured"] == 6 and s["jobs"]["unanswered"] == 1
    assert s["latency_ms"]["count"] == 3  # fast, slow, late: ok and due in the window
    assert s["latency_ms"]["p50"] == pytest.approx(1000, rel=0.01)
    assert s["latency_ms"]["max"] == pytest.approx(1400, rel=0.01)
    # Answered inside [1001, 1003): warm, fast, slow, bad; good (ok, <= 500 ms): warm, fast.
    assert s["throughput_per_s"] == 2.0 and s["goodput_per_s"] == 1.0
    assert s["errors"] == {"invalid_input": 1, "rejected": 1, "unanswered": 1}
    assert s["batch_size"]["jobs_by_size"] == {"2": 1, "4": 2}
    assert s["stages_ms"]["compute_ms"] == {"p50": 5.0, "p99": 5.0}
    assert (s["sender"]["behind_1ms"], s["sender"]["behind_10ms"]) == (2, 1)


class _FixedRateServer(Target):
    """A real server of known capacity: one thread, `per_job_s` of work a job, FIFO."""

    name = "fixed"

    def __init__(self, per_job_s: float) -> None:
        self.per_job_s = per_job_s
        self.inbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while (job_id := self.inbox.get()) is not None:
            time.sleep(self.per_job_s)
            self.done.put(Completion(job_id, "ok", time.time()))

    def start(self) -> None:
        self.thread.start()

    def send(self, jobs: Sequence[tuple[str, str]]) -> list[str]:
        for job_id, _ in jobs:
            self.inbox.put(job_id)
        return []

    def poll(self, timeout_s: float) -> list[Completion]:
        out = []
        try:
            out.append(self.done.get(timeout=timeout_s))
            while True:
                out.append(self.done.get_nowait())
        except queue.Empty:
            return out

    def stop(self) -> None:
        self.inbox.put(None)


def test_saturate_doubles_then_bisects_between_the_last_good_and_first_bad_rate():
    ns = parse(
        [
            "sweep",
            "--saturate",
            "--rate",
            "25",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--arrival",
            "constant",
            "--slo-ms",
            "400",
            "--refine",
            "2",
            "--no-progress",
        ]
    )
    server = _FixedRateServer(per_job_s=0.01)  # at most 100 jobs/s
    server.start()
    try:
        runs = saturate(server, ns)
    finally:
        server.stop()
    rates = [r["rate"] for r in runs]
    assert rates == sorted(rates), "runs come back in order of offered load"
    doublings = [r for r in rates if r in (25, 50, 100, 200, 400)]
    assert 400 not in doublings, "a 100/s server cannot keep up with 200/s"
    assert len(runs) == len(doublings) + 2, rates
    good, bad = doublings[-2], doublings[-1]
    middle = (good + bad) / 2
    assert middle in rates, f"first bisection between {good} and {bad}: {rates}"
    assert {middle - (bad - good) / 4, middle + (bad - good) / 4} & set(rates), rates
    peak = [r for r in runs if r.get("saturation")]
    assert len(peak) == 1 and peak[0]["throughput_per_s"] == max(
        r["throughput_per_s"] for r in runs
    )
