"""Sentence embeddings: mean pooling + L2 normalisation, as sentence-transformers computes them.

Truncation follows text.py (the model's `max_seq_length`, 256 for MiniLM), so outputs match
sentence-transformers for every input. The quality gate's metric is the lowest cosine between
the candidate's and fp32's embeddings of the probe set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoModel

from sluice.errors import InvalidParams
from sluice.protocol import encode_embedding
from sluice.runners.base import Encoded
from sluice.runners.text import TextRunner

log = logging.getLogger(__name__)

ENCODINGS = ("float", "base64")


class EmbedRunner(TextRunner):
    """`{"text": str}` in, a unit-length embedding out (floats, or base64 float32)."""

    task: ClassVar[str] = "embed"
    params: ClassVar[frozenset[str]] = frozenset({"encoding", "truncate"})
    quality_metric: ClassVar[str] = "min_cosine"
    quality_floor: ClassVar[float] = 0.99

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=dtype)
        self.dim = int(model.config.hidden_size)
        loaded: torch.nn.Module = model.to(self.device).eval()
        return loaded

    def check_params(self, params: dict[str, Any]) -> None:
        encoding = params.get("encoding", "float")
        if encoding not in ENCODINGS:
            raise InvalidParams(f"params.encoding must be one of {ENCODINGS}, got {encoding!r}")

    def run(self, prepared: dict[str, torch.Tensor]) -> np.ndarray[Any, Any]:
        assert self.model is not None, "load() first"
        with torch.inference_mode():
            hidden = self.model(**prepared).last_hidden_state
            mask = prepared["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            unit = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            return unit.cpu().numpy()

    def finish(self, raw: np.ndarray[Any, Any], items: Sequence[Encoded]) -> list[Any]:
        return [
            encode_embedding(raw[row], item.job.params.get("encoding", "float"))
            for row, item in enumerate(items)
        ]

    def quality(self, reference: torch.Tensor, candidate: torch.Tensor) -> float:
        # Both are unit vectors, so the row-wise dot product is the cosine.
        return float((reference.float() * candidate.float()).sum(dim=1).min())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dim": self.dim}
