"""Text classification: `AutoModelForSequenceClassification` from a local folder.

Output, per job: the best label and its score, and the `top_k` best as a list, highest first:

    {"label": "positive", "score": 0.97,
     "labels": [{"label": "positive", "score": 0.97}, {"label": "negative", "score": 0.03}]}

Scores are softmax probabilities for single-label models, and independent sigmoids for
models whose config says `problem_type: multi_label_classification` (as the transformers
pipeline does). `top_k` comes from the job's `params` (1 to the number of labels), else the
model's setting (1). Label names are the config's `id2label`. The quality gate's metric is
the agreement of the top label with fp32's over the probe set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import AutoModelForSequenceClassification

from sluice.errors import InvalidParams
from sluice.runners.base import Encoded
from sluice.runners.text import TextRunner


class ClassifyRunner(TextRunner):
    """`{"text": str}` in, labels with scores out."""

    task: ClassVar[str] = "classify"
    params: ClassVar[frozenset[str]] = frozenset({"top_k", "truncate"})
    quality_metric: ClassVar[str] = "label_agreement"
    quality_floor: ClassVar[float] = 0.99

    def load_assets(self, path: str) -> None:
        super().load_assets(path)
        id2label = getattr(self.config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.config.num_labels)]
        self.multi_label = self.config.problem_type == "multi_label_classification"

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True, dtype=dtype
        )
        loaded: torch.nn.Module = model.to(self.device).eval()
        return loaded

    def check_params(self, params: dict[str, Any]) -> None:
        top_k = params.get("top_k", 1)
        if (
            not isinstance(top_k, int)
            or isinstance(top_k, bool)
            or not (1 <= top_k <= len(self.labels))
        ):
            raise InvalidParams(
                f"params.top_k must be an integer from 1 to {len(self.labels)}, got {top_k!r}"
            )

    def run(self, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.model is not None, "load() first"
        with torch.inference_mode():
            logits = self.model(**prepared).logits.float()
            scores = torch.sigmoid(logits) if self.multi_label else logits.softmax(dim=-1)
            return scores.cpu()

    def finish(self, raw: torch.Tensor, items: Sequence[Encoded]) -> list[Any]:
        default_k = min(self.settings.top_k, len(self.labels))
        k_max = max(int(item.job.params.get("top_k", default_k)) for item in items)
        values, indices = raw.topk(k_max, dim=-1)
        outputs = []
        for row, item in enumerate(items):
            k = int(item.job.params.get("top_k", default_k))
            ranked = [
                {"label": self.labels[int(i)], "score": round(float(v), 6)}
                for v, i in zip(values[row, :k], indices[row, :k], strict=True)
            ]
            outputs.append({**ranked[0], "labels": ranked})
        return outputs

    def quality(self, reference: torch.Tensor, candidate: torch.Tensor) -> float:
        same = reference.argmax(dim=-1) == candidate.argmax(dim=-1)
        return float(same.float().mean())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": len(self.labels)}
