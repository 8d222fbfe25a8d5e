"""The generation stage's cancels (generating.ContinuousStage): a job cancelled while it is
generated leaves the running batch at the next step, every entry of it (the same id queued
twice runs twice), each answered as `skipped` so the writer acks it with the stored cancel and
counts neither a run nor a duplicate; a job that is not cancelled runs on untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sluice.batching import Batch
from sluice.generating import ContinuousStage, Tokens
from sluice.protocol import Job
from sluice.queue import Outcome
from sluice.runners.generate import GenerateRunner
from sluice.settings import ModelSettings
from tests.conftest import build_tiny_generator


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> GenerateRunner:
    folder = build_tiny_generator(tmp_path_factory.mktemp("gen") / "m")
    settings = ModelSettings(
        name="g",
        task="generate",
        model_path=str(folder),
        dtype="fp32",
        torch_threads=1,
        max_batch_size=8,
        max_new_tokens=200,
    )
    built = GenerateRunner(settings)
    built.load()
    return built


def job(entry_id: str, job_id: str, tokens: int = 200) -> Job:
    params = {"max_new_tokens": tokens, "ignore_eos": True, "stream": False}
    return Job(entry_id, job_id, {"prompt": "the quick brown fox"}, params)


def test_a_cancel_drops_every_entry_of_the_job_and_only_it(runner: GenerateRunner) -> None:
    emitted: list[Any] = []
    stage = ContinuousStage(runner, "g", 2, emitted.append, max_waiting=8)
    jobs = [job("1-0", "twice", 3), job("2-0", "twice"), job("3-0", "twice"), job("4-0", "other")]
    encoded = runner.encode(jobs)
    stage._admit(Batch(items=encoded))  # type: ignore[arg-type]
    for _ in range(5):
        stage._step()
    (first,) = [o for batch in emitted if isinstance(batch, list) for o in batch]
    assert first.entry_id == "1-0" and first.status == "ok"
    # One entry of "twice" is done; two more still run, and are still in flight.
    assert sorted(stage.in_flight()) == ["other", "twice"]
    emitted.clear()

    stage.cancel(["twice"])
    stage._drop_cancelled()

    dropped = [o for batch in emitted if isinstance(batch, list) for o in batch]
    assert all(isinstance(o, Outcome) for o in dropped)
    assert sorted(o.entry_id for o in dropped) == ["2-0", "3-0"]
    assert {o.status for o in dropped} == {"skipped"} and stage.cancelled == 2
    assert stage.in_flight() == ["other"]
    emitted.clear()
    stage._step()  # the batcher lets the cancelled rows go at its next step
    assert runner.running == 1
    while not runner.idle:
        stage._step()
    (done,) = [o for batch in emitted if isinstance(batch, list) for o in batch]
    assert done.job_id == "other" and done.status == "ok"
    assert not [b for b in emitted if isinstance(b, Tokens)]  # stream: false
    assert stage.in_flight() == []


def test_a_cancel_of_a_finished_job_is_a_no_op(runner: GenerateRunner, tmp_path: Path) -> None:
    emitted: list[Any] = []
    stage = ContinuousStage(runner, "g", 2, emitted.append, max_waiting=8)
    stage.cancel(["nobody"])
    stage._drop_cancelled()
    assert emitted == [] and stage.cancelled == 0


def test_the_gate_measures_the_perplexity_ratio(tmp_path: Path) -> None:
    """The generate gate's metric: fp32's perplexity on the probe texts over the candidate's.
    The same model scores 1; a damaged copy (noise on its weights) scores below 1."""
    import torch

    folder = build_tiny_generator(tmp_path / "m")
    settings = ModelSettings(name="g", task="generate", model_path=str(folder), dtype="fp32")
    runner = GenerateRunner(settings)
    runner.load()
    assert runner.quality_metric == "perplexity_ratio"
    reference = runner.probe()
    assert reference.ndim == 0 and float(reference) > 0  # a mean NLL, in nats
    assert runner.quality(reference, runner.probe()) == pytest.approx(1.0)
    assert runner.model is not None
    with torch.no_grad():
        for param in runner.model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    assert runner.quality(reference, runner.probe()) < 0.9
