"""The metric contract (issue 8): every metric name and label as stored in Prometheus.

What monitoring/ (dashboard, alerts) may query, what docs/metrics.md documents, and what the
live test checks a real run exports. Replica metrics arrive through Ray's metrics pipeline as
`ray_sluice_*` and are renamed to `sluice_*` by monitoring/prometheus.yml; Ray adds the labels
of `RAY_LABELS` to them. Exporter metrics come from `sluice exporter` as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["replica", "exporter", "ray"]

#: Labels Ray adds to every metric it exports (otel_scope_* are dropped by prometheus.yml).
RAY_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId"})
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    source: Source

    def series_names(self) -> tuple[str, ...]:
        """The names its series have in Prometheus: a histogram's three, or the name."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)

    def allowed_labels(self, series: str) -> frozenset[str]:
        """Labels a query may match on `series` (one of `series_names()`)."""
        extra = RAY_LABELS if self.source in ("replica", "ray") else frozenset()
        le = {"le"} if series.endswith("_bucket") else set()
        return frozenset(self.labels) | extra | TARGET_LABELS | le


def _metrics(source: Source, kind: Kind, labels: tuple[str, ...], *names: str) -> list[Metric]:
    return [Metric(name, kind, labels, source) for name in names]


M, ML = ("model",), ("model", "lane")
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        # Replicas, through Ray.
        *_metrics("replica", "counter", ("model", "status", "code"), "sluice_jobs_finished_total"),
        *_metrics(
            "replica",
            "counter",
            M,
            "sluice_jobs_pulled_total",
            "sluice_reclaims_total",
            "sluice_retries_total",
            "sluice_duplicates_total",
            "sluice_deleted_while_pending_total",
            "sluice_leases_lost_total",
            "sluice_write_failures_total",
        ),
        *_metrics(
            "replica",
            "histogram",
            M,
            "sluice_job_latency_seconds",
            "sluice_queue_wait_seconds",
            "sluice_batch_wait_seconds",
            "sluice_compute_seconds",
            "sluice_batch_size",
            "sluice_batch_tokens",
        ),
        *_metrics("replica", "gauge", M, "sluice_model_load_seconds"),
        *_metrics("replica", "gauge", ("model", "task", "dtype", "device"), "sluice_replica_info"),
        *_metrics(
            "replica",
            "gauge",
            ("model", "device"),
            "sluice_gpu_memory_used_bytes",
            "sluice_gpu_utilization_ratio",
        ),
        # Ray Serve's own, kept as Ray names it.
        *_metrics(
            "ray",
            "gauge",
            ("deployment", "application"),
            "ray_serve_autoscaling_desired_replicas",
        ),
        # `sluice exporter`, from Redis.
        *_metrics(
            "exporter",
            "gauge",
            ML,
            "sluice_queue_waiting",
            "sluice_queue_pending",
            "sluice_queue_length",
        ),
        *_metrics(
            "exporter",
            "gauge",
            M,
            "sluice_queue_oldest_job_age_seconds",
            "sluice_queue_consumers",
            "sluice_dead_letters",
            "sluice_model_registered",
        ),
        *_metrics(
            "exporter", "counter", M, "sluice_jobs_submitted_total", "sluice_rejections_total"
        ),
        *_metrics("exporter", "counter", (), "sluice_exporter_redis_errors_total"),
        *_metrics("exporter", "gauge", (), "sluice_exporter_scrape_duration_seconds"),
    ]
}

#: Series name -> its metric, for every series the contract lets a query use.
SERIES: dict[str, Metric] = {s: m for m in METRICS.values() for s in m.series_names()}
#: Series Prometheus makes itself, which rules may use too.
PROMETHEUS_SERIES = frozenset({"up"})


def replica_metrics() -> list[Metric]:
    return [m for m in METRICS.values() if m.source == "replica"]


def exporter_metrics() -> list[Metric]:
    return [m for m in METRICS.values() if m.source == "exporter"]
