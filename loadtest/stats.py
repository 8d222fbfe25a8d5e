"""Figures of one run: latency percentiles (HdrHistogram), throughput, goodput, stages, errors.

What counts where (window = the measured span after the warm-up):

- **Latency**: jobs *due* in the window that ended `ok`, from due time to answer, in an
  HdrHistogram (1 µs to 1 h, 3 significant digits). Answers that came after the window (the
  drain) count: a job that waited long is a long latency, not a job forgotten.
- **Throughput**: answers of any status whose answer time falls in the window, per second.
  **Goodput**: of those, the `ok` ones within the SLO, per second. Counting by answer time
  keeps an overloaded system from being credited with work it did after the window.
- **Stages**: medians and p99 of the result's own timings (queue wait, batch wait, compute,
  write) over the latency jobs; **batch sizes** weighted by job.
- **Errors** by code over jobs due in the window: `rejected` (refused at the door), the
  result's error codes, `expired`, and `unanswered` (no answer by the drain timeout).
- **Sender**: how many jobs went out more than 1 ms / 10 ms after their due time, and the
  worst lag (open loop; in a closed loop the due time is the send time).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from loadtest.openloop import RunRecord

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
STAGES = ("queue_ms", "batch_wait_ms", "compute_ms", "write_ms")
HIGHEST_US = 3_600_000_000  # one hour


def latency_histogram(latencies_ms: list[float]) -> HdrHistogram:
    hist = HdrHistogram(1, HIGHEST_US, 3)
    for ms in latencies_ms:
        hist.record_value(min(HIGHEST_US, max(1, round(ms * 1000))))
    return hist


def latency_summary(hist: HdrHistogram) -> dict[str, float | int]:
    """p50, p90, p99, p99.9, max and mean in ms, and the count."""
    count = hist.get_total_count()
    if count == 0:
        return {"count": 0}
    out: dict[str, float | int] = {"count": count}
    for name, q in PERCENTILES.items():
        out[name] = hist.get_value_at_percentile(q) / 1000
    out["max"] = hist.get_max_value() / 1000
    out["mean"] = hist.get_mean_value() / 1000
    return out


def latency_cdf(hist: HdrHistogram, points: int = 200) -> list[tuple[float, float]]:
    """(latency ms, percentile) pairs, dense in the tail: percentiles 1 - 10^-x, x from 0 up
    to the last nine the sample count can tell (5 at most), then the max at 100."""
    count = hist.get_total_count()
    if count == 0:
        return []
    out = []
    for x in np.linspace(0, min(5.0, np.log10(count)), points):
        q = 100 * (1 - 10 ** (-x))
        out.append((hist.get_value_at_percentile(q) / 1000, round(q, 5)))
    out.append((hist.get_max_value() / 1000, 100.0))
    return out


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def summarize(run: RunRecord, slo_ms: float) -> dict[str, Any]:
    """The figures of one run (see the module docstring)."""
    begin, end = run.window
    measured = [rec for rec in run.jobs.values() if begin <= rec.due_s < end]
    ok = [rec for rec in measured if rec.status == "ok" and rec.done_s is not None]
    latencies = [1000 * (rec.done_s - rec.due_s) for rec in ok if rec.done_s is not None]
    hist = latency_histogram(latencies)
    in_window = [
        rec
        for rec in run.jobs.values()
        if rec.done_s is not None and rec.status != "rejected" and begin <= rec.done_s < end
    ]
    good = [
        rec
        for rec in in_window
        if rec.status == "ok" and rec.done_s is not None and rec.done_s - rec.due_s <= slo_ms / 1000
    ]
    errors = Counter(rec.status or "unanswered" for rec in measured if rec.status != "ok")
    sizes = Counter(int(rec.timings["batch_size"]) for rec in ok if "batch_size" in rec.timings)
    lags = np.asarray(run.send_lag_s or [0.0])
    return {
        "target": run.target,
        "mode": run.mode,
        "offered_rate": run.offered_rate,
        "concurrency": run.concurrency,
        "sent_rate": len(measured) / run.duration_s,
        "jobs": {
            "total": len(run.jobs),
            "measured": len(measured),
            "ok": len(ok),
            "answered": sum(1 for rec in run.jobs.values() if rec.done_s is not None),
            "unanswered": sum(1 for rec in run.jobs.values() if rec.status is None),
        },
        "throughput_per_s": len(in_window) / run.duration_s,
        "goodput_per_s": len(good) / run.duration_s,
        "slo_ms": slo_ms,
        "slo_attained": len([x for x in latencies if x <= slo_ms]) / len(measured)
        if measured
        else None,
        "latency_ms": latency_summary(hist),
        "stages_ms": {
            stage: _quantiles([rec.timings[stage] for rec in ok if stage in rec.timings])
            for stage in STAGES
        },
        "batch_size": {
            "mean": sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())),
            "jobs_by_size": {str(k): v for k, v in sorted(sizes.items())},
        },
        "errors": dict(errors.most_common()),
        "sender": {
            "behind_1ms": int((lags > 0.001).sum()) if run.send_lag_s else 0,
            "behind_10ms": int((lags > 0.010).sum()) if run.send_lag_s else 0,
            "lag_p99_ms": float(np.percentile(lags, 99) * 1000),
            "lag_max_ms": float(lags.max() * 1000),
        },
        "warmup_s": run.warmup_s,
        "duration_s": run.duration_s,
        "drained": run.drained,
        "series": {
            "latency_cdf": latency_cdf(hist),
            "queue_depth": [(round(t, 3), d) for t, d in run.depth],
            "timeline": timeline(run),
        },
    }


def timeline(run: RunRecord, step_s: float = 1.0) -> list[dict[str, float]]:
    """Per second since the start: jobs due, answers, and p50/p99 of the jobs due then."""
    span = run.warmup_s + run.duration_s
    buckets = int(np.ceil(span / step_s))
    due: list[list[float]] = [[] for _ in range(buckets)]
    answered = np.zeros(buckets)
    for rec in run.jobs.values():
        k = int((rec.due_s - run.start_s) // step_s)
        if 0 <= k < buckets and rec.status == "ok" and rec.latency_ms is not None:
            due[k].append(rec.latency_ms)
        if rec.done_s is not None and rec.status != "rejected":
            a = int((rec.done_s - run.start_s) // step_s)
            if 0 <= a < buckets:
                answered[a] += 1
    sent = np.zeros(buckets)
    for rec in run.jobs.values():
        k = int((rec.due_s - run.start_s) // step_s)
        if 0 <= k < buckets:
            sent[k] += 1
    return [
        {
            "t": k * step_s,
            "offered_per_s": sent[k] / step_s,
            "answered_per_s": answered[k] / step_s,
            **(
                {
                    "p50_ms": float(np.percentile(due[k], 50)),
                    "p99_ms": float(np.percentile(due[k], 99)),
                }
                if due[k]
                else {}
            ),
        }
        for k in range(buckets)
    ]
