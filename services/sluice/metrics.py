"""What a replica measures, for Prometheus (docs/metrics.md has every name and meaning).

Replicas record through Ray's metrics pipeline (`ray.util.metrics`): each Ray node exposes the
metrics of all its processes on one port (`--metrics-export-port`), so Prometheus scrapes one
target per node, however many replicas come and go there. Ray prefixes the names with `ray_`;
monitoring/prometheus.yml renames them back to `sluice_*`. The queue's side (backlog, oldest
job, dead letters) comes from `sluice exporter`, which reads Redis, so it shows at zero replicas.

`Metrics` is the no-op the bare `Worker` uses (benchmarks, tests, `SLUICE_METRICS=false`);
`RayMetrics` is what a Serve replica uses. Counters are added once per batch and status, and
each job costs a few histogram observations (~1.5 µs each: BENCHMARKS.md).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.queue import Outcome

#: Seconds: from a few ms (a tiny model on a GPU) to minutes (a backlog, a long generation).
LATENCY_BUCKETS = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
BATCH_TOKEN_BUCKETS = [16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


class Metrics:
    """The recording interface; this base records nothing."""

    def pulled(self, n: int) -> None: ...

    def reclaimed(self, n: int) -> None: ...

    def deleted_while_pending(self, n: int) -> None: ...

    def leases_lost(self, n: int) -> None: ...

    def write_failed(self) -> None: ...

    def retried(self) -> None: ...

    def batch(self, size: int, tokens: int) -> None: ...

    def finished(self, outcomes: Sequence[Outcome], stored: int, now_ms: float) -> None: ...

    def dead_lettered(self, n: int) -> None: ...

    def loaded(self, seconds: float, task: str, dtype: str, device: str) -> None: ...

    def gpu(self, device: str) -> None: ...


class RayMetrics(Metrics):
    """The replica's metrics, every one labelled with its model."""

    def __init__(self, model: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        def counter(name: str, doc: str, *keys: str) -> Counter:
            metric = Counter(name, description=doc, tag_keys=("model", *keys))
            metric.set_default_tags({"model": model})
            return metric

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            metric = Histogram(name, description=doc, boundaries=buckets, tag_keys=("model",))
            metric.set_default_tags({"model": model})
            return metric

        def gauge(name: str, doc: str, *keys: str) -> Gauge:
            metric = Gauge(name, description=doc, tag_keys=("model", *keys))
            metric.set_default_tags({"model": model})
            return metric

        self._finished = counter(
            "sluice_jobs_finished_total",
            "Jobs answered, by final status and error code",
            "status",
            "code",
        )
        self._pulled = counter("sluice_jobs_pulled_total", "Entries pulled from the stream")
        self._reclaimed = counter("sluice_reclaims_total", "Entries reclaimed from dead consumers")
        self._retried = counter("sluice_retries_total", "Jobs run again after a retryable error")
        self._deleted = counter(
            "sluice_deleted_while_pending_total",
            "Entries deleted from a lane before they were answered (recorded as dead letters)",
        )
        self._leases_lost = counter(
            "sluice_leases_lost_total",
            "Entries another replica reclaimed from this live one (it did not renew in time)",
        )
        self._write_failures = counter(
            "sluice_write_failures_total", "Result or dead-letter writes that failed (retried)"
        )
        self._duplicates = counter(
            "sluice_duplicates_total", "Jobs run whose result another run had stored first"
        )
        self._latency = histogram(
            "sluice_job_latency_seconds", "Enqueued to result stored", LATENCY_BUCKETS
        )
        self._queue_wait = histogram(
            "sluice_queue_wait_seconds", "Enqueued to pulled by a replica", LATENCY_BUCKETS
        )
        self._batch_wait = histogram(
            "sluice_batch_wait_seconds",
            "Pulled to its batch starting on the model",
            LATENCY_BUCKETS,
        )
        self._compute = histogram(
            "sluice_compute_seconds", "The model's time on the job's batch", LATENCY_BUCKETS
        )
        self._batch_size = histogram(
            "sluice_batch_size", "Jobs per model batch", [float(b) for b in BATCH_SIZE_BUCKETS]
        )
        self._batch_tokens = histogram(
            "sluice_batch_tokens",
            "Padded tokens per model batch",
            [float(b) for b in BATCH_TOKEN_BUCKETS],
        )
        self._load = gauge("sluice_model_load_seconds", "How long the replica took to load")
        self._info = gauge("sluice_replica_info", "1 per live replica", "task", "dtype", "device")
        self._gpu_memory = gauge(
            "sluice_gpu_memory_used_bytes", "GPU memory allocated by the replica", "device"
        )
        self._gpu_util = gauge(
            "sluice_gpu_utilization_ratio", "GPU busy share (NVML), 0..1", "device"
        )

    def pulled(self, n: int) -> None:
        if n:
            self._pulled.inc(n)

    def reclaimed(self, n: int) -> None:
        if n:
            self._reclaimed.inc(n)

    def deleted_while_pending(self, n: int) -> None:
        if n:
            self._deleted.inc(n)

    def leases_lost(self, n: int) -> None:
        if n:
            self._leases_lost.inc(n)

    def write_failed(self) -> None:
        self._write_failures.inc()

    def retried(self) -> None:
        self._retried.inc()

    def batch(self, size: int, tokens: int) -> None:
        self._batch_size.observe(size)
        if tokens:
            self._batch_tokens.observe(tokens)

    def finished(self, outcomes: Sequence[Outcome], stored: int, now_ms: float) -> None:
        # "skipped": acked unrun, a final result being there already, nearly always a cancel.
        statuses = ("cancelled" if o.status == "skipped" else o.status for o in outcomes)
        codes = (o.code for o in outcomes)
        for (status, code), n in Tally(zip(statuses, codes, strict=True)).items():
            self._finished.inc(n, tags={"status": status, "code": code})
        if stored < len(outcomes):
            self._duplicates.inc(len(outcomes) - stored)
        for o in outcomes:
            if o.enqueued_ms:
                self._latency.observe(max(0.0, now_ms - o.enqueued_ms) / 1000)
            if o.timings and "compute_ms" in o.timings:
                self._queue_wait.observe(max(0.0, o.timings["queue_ms"]) / 1000)
                self._batch_wait.observe(max(0.0, o.timings["batch_wait_ms"]) / 1000)
                self._compute.observe(o.timings["compute_ms"] / 1000)

    def dead_lettered(self, n: int) -> None:
        if n:
            self._finished.inc(n, tags={"status": "dead_letter", "code": "dead_lettered"})

    def loaded(self, seconds: float, task: str, dtype: str, device: str) -> None:
        self._load.set(seconds)
        self._info.set(1, tags={"task": task, "dtype": dtype, "device": device})

    def gpu(self, device: str) -> None:
        memory, utilization = gpu_sample(device)
        self._gpu_memory.set(memory, tags={"device": device})
        if utilization is not None:
            self._gpu_util.set(utilization, tags={"device": device})


def gpu_sample(device: str) -> tuple[float, float | None]:
    """Bytes allocated by this process on `device`, and the GPU's busy share when NVML is
    there to ask (torch.cuda.utilization needs the nvidia-ml-py package)."""
    import torch

    memory = float(torch.cuda.memory_allocated(device))
    try:
        utilization: Any = torch.cuda.utilization(device)
    except Exception:  # no NVML: memory only
        return memory, None
    return memory, float(utilization) / 100
