"""Precision and quantisation, chosen at load time behind a quality gate.

`dtype: auto` picks bf16 where the hardware runs it natively (a GPU with bf16, a CPU with
avx512_bf16, AMX or Arm bf16) and fp32 elsewhere: emulated bf16 is slower than fp32.
Any choice other than plain fp32 (auto's bf16, an explicit bf16/fp16, int8 quantisation,
weight-only int8/int4 for decoders: runners/weight_only.py) is *measured* before it serves:
the runner's fixed probe set runs through an fp32 reference and through the candidate, and the
runner's own metric (embeddings: the lowest cosine; labels: the agreement; next tokens: the
perplexity ratio) must reach the floor. Below it, the replica serves fp32 and logs
why. `../shared/ANCHORS.md` is the reason: bf16 MiniLM kept cosine 0.9966 at ~3x fp32 on an
avx512_bf16 CPU, while the old `torch.ao` qint8 path was as fast and fell to 0.927.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sluice.runners.weight_only import SCHEMES, quantize_weights

if TYPE_CHECKING:
    from sluice.runners.base import Runner

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_WHY = {
    "int8": "int8 weights and activations",
    "int8-weight": "int8 weights (per channel)",
    "int4-weight": "int4 weights (groups of 32)",
}
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 and Arm names


@dataclass(slots=True)
class Precision:
    """What a replica serves, what was asked, and the gate's verdict."""

    asked: str  # e.g. "auto", "bf16+int8"
    dtype: str  # served: fp32, bf16 or fp16
    quantization: str  # served: none, int8, int8-weight or int4-weight
    metric: str
    floor: float
    score: float | None  # None: not measured (plain fp32, or the gate turned off)
    reason: str
    gate_s: float = 0.0

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CPUs whose instruction set computes in bf16 (not just converts)."""
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:  # private helpers; fall back to the kernel's flags
        pass
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {
        f
        for line in text.splitlines()
        if line.startswith(("flags", "Features"))
        for f in line.split(":", 1)[1].split()
    }
    return bool(flags & CPU_BF16_FLAGS)


def resolve_dtype(asked: str, device: torch.device) -> tuple[str, str]:
    """(dtype to try, why): `auto` resolved for this device; explicit choices kept."""
    if asked != "auto":
        return asked, f"{asked} asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU runs bf16"
        return "fp16", "auto: the GPU has no bf16, fp16 instead"
    if cpu_has_native_bf16():
        return "bf16", "auto: this CPU has native bf16"
    return "fp32", "auto: this CPU has no native bf16, so bf16 would be slower than fp32"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 activations and int8 weights on every Linear (torchao)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("quantization: int8 needs torchao (pip install torchao)") from exc
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def load_gated(runner: Runner) -> Precision:
    """Loads `runner.model` in the precision the settings ask for, if it passes the gate."""
    settings = runner.settings
    dtype, why = resolve_dtype(settings.dtype, runner.device)
    quant = settings.quantization
    asked = settings.dtype + ("" if quant == "none" else f"+{quant}")
    if quant != "none":
        why += f", with {QUANT_WHY[quant]}"
    unsupported = weight_only_unsupported(quant, dtype, runner.device, settings.task)
    if unsupported:
        log.warning("quantization %s not used: %s", quant, unsupported)
        why += f", which is not used: {unsupported}"
        quant = "none"
    floor = runner.quality_floor if settings.quality_floor is None else settings.quality_floor
    verdict = Precision(asked, dtype, quant, runner.quality_metric, floor, None, why)
    if dtype == "fp32" and quant == "none":
        runner.model = runner.build_model(torch.float32)
        return verdict
    if floor <= 0:
        runner.model, packed = _candidate(runner, dtype, quant)
        verdict.reason = f"{why}{packed}; quality gate off (floor 0)"
        return verdict
    started = time.monotonic()
    runner.model = runner.build_model(torch.float32)
    reference = runner.probe()
    fp32_model = runner.model
    try:
        runner.model, packed = _candidate(runner, dtype, quant, base=fp32_model)
        why += packed
        verdict.score = float(runner.quality(reference, runner.probe()))
    except (RuntimeError, NotImplementedError) as exc:  # e.g. fp16 kernels missing on a CPU
        verdict.reason = f"{why}, but it failed on the probe set: {exc}"
    verdict.gate_s = round(time.monotonic() - started, 3)
    if verdict.score is not None and verdict.score >= floor:
        verdict.reason = f"{why}; {verdict.metric} {verdict.score:.4f} >= {floor}"
        log.info("precision %s/%s kept: %s", dtype, quant, verdict.reason)
        return verdict
    if verdict.score is not None:
        verdict.reason = f"{why}, but {verdict.metric} {verdict.score:.4f} < {floor}"
    log.warning("precision %s/%s refused, serving fp32: %s", dtype, quant, verdict.reason)
    runner.model = fp32_model
    verdict.dtype, verdict.quantization = "fp32", "none"
    return verdict


def _candidate(
    runner: Runner, dtype: str, quant: str, base: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, str]:
    """The candidate model: a cast copy of `base` (the fp32 reference the gate loaded: no
    second load, which for a GGUF file means dequantising it all again), else a fresh load;
    and, for a weight-only scheme, what it packed (for the verdict's reason)."""
    if base is not None:
        model = copy.deepcopy(base).to(DTYPES[dtype])
    else:
        model = runner.build_model(DTYPES[dtype])
    if quant == "int8":
        return quantize_int8(model), ""
    if quant in SCHEMES:
        packed = quantize_weights(model, quant)
        log.info("%s: %s", quant, packed.describe())
        return model, f" ({packed.describe()})"
    return model, ""


def weight_only_unsupported(
    quant: str, dtype: str, device: torch.device, task: str = "generate"
) -> str | None:
    """Why a weight-only scheme cannot serve this model (None: it can)."""
    if quant not in SCHEMES:
        return None
    if task != "generate":
        return "it is for decoders (task generate): an encoder's batches are compute-bound"
    if device.type != "cpu":
        return "its kernels are PyTorch's CPU ones"
    if dtype != "bf16":
        return f"its kernels compute in bf16 (their {dtype} path is ~10x slower than dense)"
    return None
