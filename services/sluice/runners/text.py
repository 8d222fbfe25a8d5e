"""What embedding and classification share: `{"text": str}` in, one encoder forward per batch.

Inputs longer than `max_length` tokens are truncated (the model's own limit by default: for
sentence-transformers folders, `max_seq_length` of sentence_bert_config.json), as
sentence-transformers and the transformers pipelines do. With `truncate: false` (the model's
setting, or a job's `params`) a longer input is refused instead, `input_too_large`, as
text-embeddings-inference does by default.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from sluice.errors import InputTooLarge, InvalidInput, InvalidParams, SluiceError
from sluice.protocol import Job
from sluice.runners.base import Encoded, Runner
from sluice.runners.probes import PROBE_TEXTS


class TextRunner(Runner):
    """Validation, tokenization and padding for one-text-in runners."""

    params: ClassVar[frozenset[str]] = frozenset({"truncate"})

    def load_assets(self, path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.max_length = self.settings.max_length or _default_max_length(path, self.config)

    @abstractmethod
    def check_params(self, params: dict[str, Any]) -> None:
        """Raises `InvalidParams` for a value this runner does not take."""

    def encode(self, jobs: Sequence[Job]) -> list[Encoded | SluiceError]:
        checked: list[Encoded | SluiceError] = []
        for job in jobs:
            try:
                checked.append(Encoded(job, 0, self._check(job)))
            except SluiceError as err:
                checked.append(err)
        valid = [c for c in checked if isinstance(c, Encoded)]
        if not valid:
            return checked
        # One token past the limit tells "fits" from "too long" in the same tokenizer pass.
        ids = self._tokenize([c.data for c in valid], self.max_length + 1)
        too_long = [i for i, token_ids in enumerate(ids) if len(token_ids) > self.max_length]
        cut = [i for i in too_long if valid[i].job.params.get("truncate", self.settings.truncate)]
        if cut:
            # Re-tokenized at the limit, so the special tokens end up where the model expects.
            for i, token_ids in zip(cut, self._tokenize([valid[i].data for i in cut]), strict=True):
                ids[i] = token_ids
        refused = set(too_long) - set(cut)
        for i, (item, token_ids) in enumerate(zip(valid, ids, strict=True)):
            if i in refused:
                item.data = InputTooLarge(
                    f"input is over the model's limit of {self.max_length} tokens and "
                    "truncate is false"
                )
                continue
            item.data, item.cost = token_ids, len(token_ids)
        return [
            c.data if isinstance(c, Encoded) and isinstance(c.data, SluiceError) else c
            for c in checked
        ]

    def _check(self, job: Job) -> str:
        text = job.input.get("text")
        if not isinstance(text, str):
            raise InvalidInput(f"input.text must be a string, got {type(text).__name__}")
        extra = set(job.input) - {"text"}
        if extra:
            raise InvalidInput(
                f"unknown input fields {sorted(extra)}; model task {self.task} takes only `text`"
            )
        unknown = set(job.params) - self.params
        if unknown:
            raise InvalidParams(f"unknown params {sorted(unknown)}; allowed: {sorted(self.params)}")
        if not isinstance(job.params.get("truncate", True), bool):
            raise InvalidParams("params.truncate must be true or false")
        self.check_params(job.params)
        return text

    def _tokenize(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        encoded = self.tokenizer(
            texts,
            truncation=True,
            max_length=max_length or self.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return list(encoded["input_ids"])

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        width = max(item.cost for item in items)
        input_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            input_ids[row, : item.cost] = item.data
            mask[row, : item.cost] = 1
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def probe(self) -> torch.Tensor:
        jobs = [
            Job(entry_id=f"0-{i}", id=f"probe-{i}", input={"text": text}, params={})
            for i, text in enumerate(PROBE_TEXTS)
        ]
        items = [e for e in self.encode(jobs) if isinstance(e, Encoded)]
        return torch.as_tensor(self.run(self.collate(items)))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_length": self.max_length}


def _default_max_length(path: str, config: Any) -> int:
    limit = int(getattr(config, "max_position_embeddings", 512))
    st_config = Path(path) / "sentence_bert_config.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(declared, int) and declared > 0:
            return min(declared, limit)
    return limit
