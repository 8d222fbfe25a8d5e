"""Replica metrics through Ray's pipeline: a real replica's jobs show up, with the right
counts, on the node's metrics port, as Prometheus would scrape them (docs/metrics.md)."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, model: str) -> Samples:
    """Every sample of one model's Sluice metrics, by name (Ray's `ray_` prefix dropped, as
    monitoring/prometheus.yml's relabeling does)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_sluice_") and sample.labels.get("model") == model:
                out[sample.name.removeprefix("ray_")].append((sample.labels, sample.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def test_replica_metrics_count_what_the_replica_did(
    r, deploy, tiny_bert, model_name, ray_metrics_url
):
    deploy(model_name, tiny_bert, max_batch_size=16)
    ids = xadd_jobs(r, model_name, [f"sentence {i}" for i in range(100)])
    r.xadd(f"sluice:{{{model_name}}}:jobs", {"id": "bad-1", "input": "not json"})
    r.xadd(f"sluice:{{{model_name}}}:jobs", {"input": '{"text": "no id"}'})
    results = wait_all_results(r, model_name, [*ids, "bad-1"])
    assert sum(res["status"] == "ok" for res in results.values()) == 100

    def settled() -> Samples | None:
        # Ray exports every few seconds: wait until the last job and the dead letter show.
        samples = scrape(ray_metrics_url, model_name)
        done = total(samples, "sluice_jobs_finished_total")
        return samples if done >= 102 else None

    samples = wait_for(settled, 60, 1.0, "the replica's metrics on the node's port")
    assert total(samples, "sluice_jobs_finished_total", status="ok", code="") == 100
    assert total(samples, "sluice_jobs_finished_total", status="error", code="invalid_input") == 1
    assert total(samples, "sluice_jobs_finished_total", status="dead_letter") == 1
    assert total(samples, "sluice_jobs_pulled_total") == 102
    for name in ("job_latency", "queue_wait", "batch_wait", "compute"):
        assert total(samples, f"sluice_{name}_seconds_count") == 100, name
    assert total(samples, "sluice_job_latency_seconds_count") == 100
    # Batches: 100 jobs in batches of at most 16 (Ray's histogram sums are approximate, so
    # counts and buckets are what is checked).
    batches = total(samples, "sluice_batch_size_count")
    assert batches >= 100 / 16
    assert total(samples, "sluice_batch_size_bucket", le="16.0") == batches
    assert total(samples, "sluice_batch_size_bucket", le="1.0") < batches
    assert total(samples, "sluice_batch_tokens_count") == batches
    [(info, one)] = samples["sluice_replica_info"]
    assert one == 1 and info["task"] == "embed" and info["dtype"] == "fp32"
    assert info["device"] == "cpu"
    assert total(samples, "sluice_model_load_seconds") > 0
