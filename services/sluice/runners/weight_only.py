"""Weight-only int8 and int4 Linear layers on PyTorch's own CPU kernels.

Decoding is memory-bound: each step reads every weight once for a handful of rows, so the
bytes of the weights set its speed (issue 18: ~270 MB a step in bf16 for SmolLM2-135M, ~96 MB
in the GGUF: Q4_1 blocks and a Q8_0 output projection). Encoders are not offered these
schemes: their batches are compute-bound, where bf16 is faster. These layers keep the
weights packed and dequantise inside the matmul:

- `int8-weight`: one scale per output channel, symmetric (`torch._weight_int8pack_mm`);
- `int4-weight`: groups of 32 input features with a scale and an offset each, asymmetric
  (`torch._weight_int4pack_mm_for_cpu`, the kernel gpt-fast and torchao's CPU path call).
  That is the shape of GGUF's Q4_1 (blocks of 32, `d * q + m`), so a model that shipped as
  Q4_1 is re-quantised onto nearly its own grid. The output projection stays int8.

Both kernels compute in bf16 (their fp32 paths are ~10x slower than a dense fp32 matmul here),
so they are only offered with a bf16 model. torchao 0.18's int4 layouts are CUDA-only and its
int8 weight-only path took 1.9 ms where this kernel takes ~0.1 ms (BENCHMARKS.md), hence the
ATen kernels. Any use is behind the quality gate (runners/precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP_SIZE = 32  # input features per int4 scale/offset: GGUF Q4_1's block
INT4_MIDPOINT = 8  # the kernel dequantises q in 0..15 as (q - 8) * scale + offset
SCHEMES = ("int8-weight", "int4-weight")


class _PackedLinear(nn.Module):
    """What both packed layers share: rows in, the kernel, the bias, the input's shape back."""

    bias: torch.Tensor | None
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous rows: the kernels read A densely (a `[:, 0]` slice is strided).
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = self._matmul(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8WeightLinear(_PackedLinear):
    """y = x @ (q * scale).T + bias, q int8 per output channel."""

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8)
        dtype = linear.weight.dtype
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.to(dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.q, self.scale)


class Int4WeightLinear(_PackedLinear):
    """y = x @ W.T + bias, W in groups of `GROUP_SIZE` inputs: ((q - 8) * scale + offset)."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        dtype = linear.weight.dtype
        # The codes are chosen against the scale and offset as the kernel will read them
        # (rounded to the model's dtype), not against their exact values.
        scale = ((high - low) / 15.0).clamp(min=1e-12).to(dtype).float()
        offset = (low + scale * INT4_MIDPOINT).to(dtype).float()
        zero = offset - scale * INT4_MIDPOINT  # the value code 0 stands for
        q = torch.round((groups - zero[..., None]) / scale[..., None]).clamp(0, 15)
        q_int = q.to(torch.int32).reshape(out_features, in_features)
        # [groups, out, 2]: the layout the kernel reads its scales and offsets in.
        scales = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q_int, 1))
        self.register_buffer("scales", scales.to(dtype))
        self.bias = linear.bias
        self.group_size = group_size
        self.in_features, self.out_features = in_features, out_features

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales)


def fits(linear: nn.Linear, scheme: str) -> bool:
    """Whether the kernel takes this layer's shape; a layer that does not stays dense.

    Both kernels need whole blocks of 16 input features (the int8 one crashes the process
    without them, or returns garbage for one row); int4 also needs whole groups of 32 inputs
    and a multiple of 16 outputs (its packing refuses others, e.g. a 2-label head).
    """
    if linear.in_features % 16:
        return False
    if scheme == "int8-weight":
        return True
    return linear.in_features % GROUP_SIZE == 0 and linear.out_features % 16 == 0


@dataclass(frozen=True, slots=True)
class Packed:
    """What `quantize_weights` did: layers packed, and Linear layers left dense (misfits)."""

    packed: int
    dense: int

    def describe(self) -> str:
        return f"{self.packed} Linear layers packed, {self.dense} left dense"


def quantize_weights(model: nn.Module, scheme: str) -> Packed:
    """Replaces every Linear the scheme fits in place; how many it did and did not.

    The output projection (lm_head) gets int8 under either scheme: a token's logits are read
    off it directly, with no layer after it to absorb the error, and int4 there cost SmolLM2
    5% of its perplexity (the GGUF itself keeps that matrix in Q8_0, the rest in Q4_1). A tied
    lm_head is untied on the way: the embedding keeps its dense rows (a lookup reads only a
    few), the projection a packed copy (every step reads all of it).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weight-only scheme {scheme!r}; one of {SCHEMES}")
    output = _output_projection(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    packed = 0
    for name, module in linears:
        int8 = scheme == "int8-weight" or module is output
        if not fits(module, "int8-weight" if int8 else scheme):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8WeightLinear(module) if int8 else Int4WeightLinear(module))
        packed += 1
    return Packed(packed, len(linears) - packed)


def _output_projection(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    return output if isinstance(output, nn.Module) else None
