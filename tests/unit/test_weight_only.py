"""Weight-only int8/int4 layers (runners/weight_only.py) against the dense matmul they replace,
and their place in the precision gate (runners/precision.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sluice.runners import build_runner
from sluice.runners.precision import weight_only_unsupported
from sluice.runners.weight_only import (
    GROUP_SIZE,
    Int4WeightLinear,
    Int8WeightLinear,
    Packed,
    fits,
    quantize_weights,
)
from sluice.settings import ModelSettings


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach().float()).norm() / want.float().norm())


def dense(out_features: int, in_features: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    return linear.to(torch.bfloat16)


def test_int8_weights_match_the_dense_layer_for_any_leading_shape():
    linear = dense(96, 128)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    got = Int8WeightLinear(linear)(x)
    assert got.shape == (3, 5, 96) and got.dtype == torch.bfloat16
    assert relative_error(got, linear(x)) < 0.02


def test_int4_weights_are_close_and_exact_on_a_q4_1_grid():
    """Generic weights lose a little; weights already on GGUF Q4_1's grid (blocks of 32,
    d * q + m) come back as they were, up to the bf16 of the scales: what a model shipped as
    Q4_1 gets."""
    linear = dense(64, 256, bias=False)
    x = torch.randn(7, 256, dtype=torch.bfloat16)
    generic = relative_error(Int4WeightLinear(linear)(x), linear(x))
    assert generic < 0.15

    blocks = linear.weight.detach().float().reshape(64, 256 // GROUP_SIZE, GROUP_SIZE)
    low = blocks.amin(-1, keepdim=True)
    step = (blocks.amax(-1, keepdim=True) - low) / 15
    on_grid = (torch.round((blocks - low) / step) * step + low).reshape(64, 256)
    with torch.no_grad():
        linear.weight.copy_(on_grid.to(torch.bfloat16))
    exact = relative_error(Int4WeightLinear(linear)(x), linear(x))
    assert exact < generic / 5, (exact, generic)


def test_quantize_weights_replaces_every_linear_and_keeps_lm_head_int8(tiny_generator):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_generator, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[5, 9, 3, 7, 11]])
    with torch.no_grad():
        before = model(ids).logits
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize_weights(model, "int4-weight") == Packed(linears, 0)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8WeightLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4WeightLinear)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_shapes_the_kernels_cannot_take_stay_dense():
    """The int8 kernel crashes the process on inputs not in blocks of 16 (TinyBERT's 312);
    int4 packing refuses outputs not in blocks of 16 (a 2-label head): those layers are left
    dense, the rest packed, and the count says so."""
    model = nn.Sequential(
        nn.Linear(312, 64), nn.Linear(64, 2), nn.Linear(64, 64), nn.Linear(96, 48)
    ).to(torch.bfloat16)
    assert [fits(m, "int8-weight") for m in model] == [False, True, True, True]
    assert [fits(m, "int4-weight") for m in model] == [False, False, True, True]
    assert quantize_weights(model, "int4-weight") == Packed(packed=2, dense=2)
    assert [type(m).__name__ for m in model] == [
        "Linear",
        "Linear",
        "Int4WeightLinear",
        "Int4WeightLinear",
    ]
    for layer in model:
        x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
        assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("layer", [Int8WeightLinear, Int4WeightLinear])
def test_a_strided_input_is_taken(layer):
    """A `[:, 0]` slice (BERT's pooler, a classifier head) is not contiguous."""
    linear = dense(64, 128)
    hidden = torch.randn(4, 7, 128, dtype=torch.bfloat16)
    first = hidden[:, 0]
    assert not first.is_contiguous()
    assert relative_error(layer(linear)(first), linear(first)) < 0.15


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown weight-only scheme"):
        quantize_weights(nn.Sequential(nn.Linear(64, 64)), "int3-weight")


def test_weight_only_is_offered_only_to_decoders_in_bf16_on_a_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert weight_only_unsupported("int4-weight", "bf16", cpu, "generate") is None
    assert weight_only_unsupported("none", "fp32", cpu, "embed") is None
    assert "bf16" in str(weight_only_unsupported("int8-weight", "fp32", cpu))
    assert "CPU" in str(weight_only_unsupported("int4-weight", "bf16", gpu))
    assert "decoders" in str(weight_only_unsupported("int4-weight", "bf16", cpu, "embed"))


@pytest.mark.parametrize("scheme", ["int8-weight", "int4-weight"])
def test_the_gate_measures_weight_only_schemes_and_reports_them(tiny_generator, scheme):
    settings = ModelSettings(
        task="generate",
        model_path=tiny_generator,
        dtype="bf16",
        quantization=scheme,
        quality_floor=0.5,
        torch_threads=1,
    )
    runner = build_runner(settings)
    runner.load()
    verdict = runner.precision
    assert verdict.asked == f"bf16+{scheme}"
    # Measured, not assumed: the random model's perplexity moves, but not by half.
    assert verdict.score is not None and 0.5 <= verdict.score < 2.0, verdict
    assert (verdict.dtype, verdict.quantization) == ("bf16", scheme), verdict
    assert isinstance(runner.model.get_output_embeddings(), Int8WeightLinear)


def test_fp32_with_a_weight_only_scheme_serves_fp32_and_says_why(tiny_generator):
    settings = ModelSettings(
        task="generate",
        model_path=tiny_generator,
        dtype="fp32",
        quantization="int4-weight",
        torch_threads=1,
    )
    runner = build_runner(settings)
    runner.load()
    verdict = runner.precision
    assert (verdict.dtype, verdict.quantization, verdict.score) == ("fp32", "none", None)
    assert "not used" in verdict.reason and "bf16" in verdict.reason
