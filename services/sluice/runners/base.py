"""The Runner contract: what the replica knows of a model, and nothing more.

A runner turns jobs into wire outputs in four steps, each called from a worker thread:

    encode(jobs)     -> [Encoded | SluiceError]   validate and tokenize; cost = tokens
    collate(items)   -> prepared   pad a batch of encoded jobs into tensors
    run(prepared)    -> raw        the forward pass (the only step on the device)
    finish(raw, items) -> outputs  one JSON-able output per job, in order

A `SluiceError` in `encode`'s answer fails that job alone; `run` raising fails the batch.
A *continuous* runner (generation) replaces `run`/`finish` with `admit` and `step`: jobs join
and leave the running batch between steps, and each step reports tokens as they come
(`ContinuousRunner`).

`load` is the same for every runner: set torch up, find the weights, load the tokenizer
(`load_assets`), then the model in the precision the settings ask for, behind the quality
gate (precision.py): `build_model`, `probe` and `quality` are each runner's part of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sluice.errors import SluiceError
from sluice.protocol import Job
from sluice.runners import precision
from sluice.runners.loading import resolve_model_files, setup_torch
from sluice.settings import ModelSettings


@dataclass(slots=True)
class Encoded:
    """One job after tokenization; `cost` is its length in tokens (the batcher's unit)."""

    job: Job
    cost: int
    data: Any


class Runner(ABC):
    """A loaded model that runs batches of one task."""

    task: ClassVar[str]
    continuous: ClassVar[bool] = False
    quality_metric: ClassVar[str]  # what `quality` measures, for logs and `describe`
    quality_floor: ClassVar[float]  # the default floor of the gate

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.model: torch.nn.Module | None = None
        self.precision: precision.Precision | None = None

    def load(self) -> None:
        """Loads tokenizer and weights; called once, off the event loop."""
        self.device = setup_torch(self.settings)
        self.files = resolve_model_files(self.settings.model_path)
        self.path = self.files.folder
        self.load_assets(self.path)
        self.precision = precision.load_gated(self)

    @abstractmethod
    def load_assets(self, path: str) -> None:
        """Loads what is not the model (the tokenizer, config-derived limits)."""

    @abstractmethod
    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The model from `self.path` in `dtype`, on `self.device`, in eval mode."""

    @abstractmethod
    def probe(self) -> torch.Tensor:
        """`self.model`'s outputs on the fixed probe set (probes.py), as the gate compares them."""

    @abstractmethod
    def quality(self, reference: torch.Tensor, candidate: torch.Tensor) -> float:
        """How close the candidate's probe outputs are to fp32's: 1.0 is identical."""

    @abstractmethod
    def encode(self, jobs: Sequence[Job]) -> list[Encoded | SluiceError]:
        """Validates and tokenizes jobs: one `Encoded`, or the error of that job, each."""

    @abstractmethod
    def collate(self, items: Sequence[Encoded]) -> Any:
        """Pads a batch into whatever `run` takes."""

    @abstractmethod
    def run(self, prepared: Any) -> Any:
        """Runs the model on one collated batch."""

    @abstractmethod
    def finish(self, raw: Any, items: Sequence[Encoded]) -> list[Any]:
        """One JSON-able output per item, in order."""

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded model, for logs and `sluice status`."""
        facts: dict[str, Any] = {"task": self.task, "model_path": self.settings.model_path}
        if self.precision is not None:
            facts["precision"] = self.precision.describe()
        config = getattr(self.model, "config", None)
        if config is not None:
            facts["attention"] = getattr(config, "_attn_implementation", None)
        return facts


@dataclass(slots=True)
class Progress:
    """What one step of a continuous runner did for one job: new text, and the end."""

    item: Encoded
    text: str  # new text since the job's previous Progress
    seq: int  # 0, 1, 2... per job: the order of its deltas
    output: Any = None  # set on the job's last Progress: its JSON-able output
    timings: dict[str, float] | None = None  # set with `output`: the runner's own (ttft_ms...)

    @property
    def finished(self) -> bool:
        return self.output is not None


class ContinuousRunner(Runner):
    """A runner whose batch changes between steps (generation): `admit` jobs any time, `step`
    again and again; each step reports progress for every job it advanced."""

    continuous: ClassVar[bool] = True

    @abstractmethod
    def admit(self, items: Sequence[Encoded]) -> None:
        """Queues encoded jobs to join the running batch at the next step."""

    @abstractmethod
    def step(self) -> list[Progress]:
        """One iteration (admit what fits, one token for every running job)."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Jobs admitted but not yet running."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Jobs in the running batch."""

    @property
    @abstractmethod
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""

    @abstractmethod
    def abandon(self) -> list[Encoded]:
        """Drops every job waiting or running (after a failed step) and returns them."""

    @abstractmethod
    def cancel(self, job_ids: Collection[str]) -> list[Encoded]:
        """Drops the jobs of these ids, waiting or running, and returns them: their answers
        are no longer wanted (cancelled). Called on the model thread, between steps."""

    def collate(self, items: Sequence[Encoded]) -> list[Encoded]:
        return list(items)  # no padding here: the scheduler batches row by row

    def run(self, prepared: Any) -> Any:
        raise TypeError(f"{self.task} is a continuous runner: use admit() and step()")

    def finish(self, raw: Any, items: Sequence[Encoded]) -> list[Any]:
        raise TypeError(f"{self.task} is a continuous runner: use admit() and step()")
