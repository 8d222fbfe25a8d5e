"""The Runner contract: what the replica knows of a model, and nothing more.

A runner turns jobs into wire outputs in four steps, each called from a worker thread:

    encode(jobs)     -> [Encoded | SluiceError]   validate and tokenize; cost = tokens
    collate(items)   -> prepared   pad a batch of encoded jobs into tensors
    run(prepared)    -> raw        the forward pass (the only step on the device)
    finish(raw, items) -> outputs  one JSON-able output per job, in order

A `SluiceError` in `encode`'s answer fails that job alone; `run` raising fails the batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sluice.errors import SluiceError
from sluice.protocol import Job
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

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    @abstractmethod
    def load(self) -> None:
        """Loads weights and tokenizer; called once, off the event loop."""

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
        return {"task": self.task, "model_path": self.settings.model_path}
