"""The null runner: the right output, no model. It measures the pipeline's own ceiling.

`{"text": str}` in, a unit vector of `dim` floats out (the shape MiniLM's embeddings have, 384
by default; `model_path: null:<dim>` for another), so every other stage runs as for a real
embedding model: decoding the entries, validation, batching, building the results, the Redis
writes. No tokenizer, no torch: a job's cost (the batcher's unit) is its length in bytes over
four, about a token's worth. `python -m loadtest.drain --model null` drains through it
(BENCHMARKS.md: the replica's per-job cost, the bound on a GPU where the model is nearly free).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sluice.errors import InvalidInput, InvalidParams, SluiceError
from sluice.protocol import Job, encode_embedding
from sluice.runners.base import Encoded, Runner
from sluice.runners.embed import ENCODINGS

DEFAULT_DIM = 384


class NullRunner(Runner):
    """Embeddings of the right shape, computed by nothing."""

    task: ClassVar[str] = "null"
    quality_metric: ClassVar[str] = "none"
    quality_floor: ClassVar[float] = 0.0

    def load(self) -> None:
        _, _, dim = self.settings.model_path.partition(":")
        self.dim = int(dim) if dim else DEFAULT_DIM
        # One fixed unit vector per row: what `run` hands `finish`, as a model's output would.
        self._rows = np.full((self.settings.max_batch_size, self.dim), self.dim**-0.5, np.float32)

    def load_assets(self, path: str) -> None:  # pragma: no cover - nothing to load
        raise NotImplementedError

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:  # pragma: no cover
        raise NotImplementedError

    def probe(self) -> torch.Tensor:  # pragma: no cover - no gate: there is no model
        raise NotImplementedError

    def quality(self, reference: torch.Tensor, candidate: torch.Tensor) -> float:
        return 1.0

    def encode(self, jobs: Sequence[Job]) -> list[Encoded | SluiceError]:
        out: list[Encoded | SluiceError] = []
        for job in jobs:
            text = job.input.get("text")
            encoding = job.params.get("encoding", "float")
            if not isinstance(text, str):
                out.append(InvalidInput(f"input.text must be a string, got {type(text).__name__}"))
            elif encoding not in ENCODINGS:
                out.append(InvalidParams(f"params.encoding must be one of {ENCODINGS}"))
            else:
                out.append(Encoded(job, max(1, len(text) // 4), None))
        return out

    def collate(self, items: Sequence[Encoded]) -> int:
        return len(items)

    def run(self, prepared: int) -> np.ndarray[Any, Any]:
        return self._rows[:prepared]

    def finish(self, raw: np.ndarray[Any, Any], items: Sequence[Encoded]) -> list[Any]:
        return [
            encode_embedding(raw[row], item.job.params.get("encoding", "float"))
            for row, item in enumerate(items)
        ]

    def describe(self) -> dict[str, Any]:
        return {"task": self.task, "model_path": self.settings.model_path, "dim": self.dim}
