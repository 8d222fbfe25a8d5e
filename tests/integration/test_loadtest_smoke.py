"""The load generator end to end on a tiny model (no timing assertions): an open-loop run
through admission, then closed loops against raw XADD and the bare model in one `compare`.
Each writes its report folder, and every job sent is answered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loadtest.cli import main

pytestmark = pytest.mark.integration

FILES = (
    "report.json",
    "summary.md",
    "latency_vs_load.png",
    "throughput_vs_load.png",
    "latency_cdf.png",
    "queue_depth.png",
    "timeline.png",
    "stages.png",
)


def _check_report(folder: Path, targets: set[str]) -> None:
    for name in FILES:
        assert (folder / name).stat().st_size > 0, f"{name} missing in {folder}"
    report = json.loads((folder / "report.json").read_text())
    assert {run["target"] for run in report["runs"]} == targets
    for run in report["runs"]:
        jobs = run["jobs"]
        assert jobs["total"] > 0 and jobs["measured"] > 0
        assert jobs["answered"] == jobs["total"] and jobs["unanswered"] == 0, jobs
        assert run["errors"] == {}, run["errors"]
        assert run["latency_ms"]["count"] == jobs["measured"]
    assert "| target |" in (folder / "summary.md").read_text()


def test_loadtest_open_and_closed_loops_answer_every_job(
    deploy, model_name, tiny_bert, producer_url, tmp_path
):
    deploy(model_name, tiny_bert, max_batch_size=16)
    common = [
        "--redis-url",
        producer_url,
        "--model",
        model_name,
        "--model-path",
        tiny_bert,
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--warmup",
        "1",
        "--slo-ms",
        "2000",
        "--drain-timeout",
        "60",
        "--no-progress",
    ]
    opened = tmp_path / "open"
    argv = ["run", "--target", "sluice", "--rate", "40", "--duration", "7", "--out", str(opened)]
    assert main([*argv, *common]) == 0
    _check_report(opened, {"sluice"})

    closed = tmp_path / "closed"
    argv = ["compare", "--targets", "sluice-xadd,bare", "--concurrency", "4", "--duration", "3"]
    assert main([*argv, "--out", str(closed), *common]) == 0
    _check_report(closed, {"sluice-xadd", "bare"})
    comparison = json.loads((closed / "report.json").read_text())["comparison"]
    assert set(comparison["targets"]) == {"sluice-xadd", "bare"}


def test_rediscost_measures_every_phase(tmp_path):
    """The Redis-cost benchmark on its own redis-server: each phase measured, all jobs served."""
    from loadtest.rediscost import main as rediscost

    out = tmp_path / "cost.json"
    assert (
        rediscost(["--jobs", "600", "--repeats", "1", "--encoding", "base64", "--out", str(out)])
        == 0
    )
    summary = json.loads(out.read_text())["summary"]
    for key in ("submit_raw_us", "submit_admitted_us", "serve_us", "total_us"):
        assert summary[key]["median"] >= 0, key
    # 384 float32 as base64 (2,048 characters) plus the id, status and timings.
    assert 2048 < summary["result_bytes"]["median"] < 2600
    assert summary["jobs_per_s_per_core"]["median"] > 0


def test_pipeline_benchmark_drains_through_two_replica_processes(tmp_path):
    """`loadtest.pipeline`: every job answered `ok` by replica processes sharing one queue,
    each process's CPU and Redis' counted, and Redis' CPU split by command."""
    from loadtest.pipeline import main as pipeline

    out = tmp_path / "pipeline.json"
    argv = ["--n", "3000", "--repeats", "1", "--replicas", "2", "--batch-size", "32"]
    assert pipeline([*argv, "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["ok"] == 3000
    assert run["jobs_per_s"] > 0 and run["replica_cpu_us_per_job"] > 0
    assert {"evalsha", "set", "xack"} <= set(run["redis_us_per_job_by_command"])
