"""The prep stage: tokenize, cut into batches, collate, queue for the model (prep thread).

Runs on its own thread so tokenizing batch k+1 overlaps the forward pass of batch k. Queuing
blocks while the run queue is full: that is what stops the pull loop pulling (backpressure).
A job its runner refuses (bad input, too long) is answered at once; an input that breaks the
tokenizer itself is found by encoding one job at a time, so only it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sluice.batching import Batch, cut_batches
from sluice.errors import InvalidInput, ModelFailure, SluiceError
from sluice.protocol import Job
from sluice.queue import Outcome
from sluice.runners.base import Encoded, Runner
from sluice.running import failed
from sluice.settings import ModelSettings

log = logging.getLogger(__name__)


class Preparer:
    """Turns pulled jobs into collated batches and hands them to `submit`."""

    def __init__(
        self, runner: Runner, model: ModelSettings, submit: Callable[[Batch], None]
    ) -> None:
        self.runner = runner
        self.model = model
        self.submit = submit

    def __call__(self, jobs: list[Job]) -> list[Outcome]:
        """Queues the jobs' batches; returns the outcomes of jobs refused at tokenization."""
        encoded = self.encode(jobs)
        valid = [item for item in encoded if isinstance(item, Encoded)]
        refused = [
            failed(self.model.name, job, item)
            for job, item in zip(jobs, encoded, strict=True)
            if isinstance(item, SluiceError)
        ]
        lanes = sorted({item.job.lane for item in valid})
        groups = [
            group
            for lane in lanes
            for group in cut_batches(
                [item for item in valid if item.job.lane == lane],
                self.model.max_batch_size,
                self.model.max_batch_tokens,
            )
        ]
        for group in groups:
            try:
                prepared = self.runner.collate(group)
            except Exception as exc:
                log.exception("collate failed for a batch of %d", len(group))
                err = ModelFailure(f"{type(exc).__name__}: {exc}")
                refused += [failed(self.model.name, item.job, err) for item in group]
                continue
            self.submit(Batch(group, prepared))
        return refused

    def encode(self, jobs: list[Job]) -> list[Encoded | SluiceError]:
        try:
            return self.runner.encode(jobs)
        except Exception:
            # One input broke the tokenizer: find it by encoding jobs one at a time.
            log.exception("encode failed for a batch of %d; isolating", len(jobs))
            out: list[Encoded | SluiceError] = []
            for job in jobs:
                try:
                    out.extend(self.runner.encode([job]))
                except Exception as exc:
                    out.append(InvalidInput(f"input could not be tokenized: {exc}"))
            return out
