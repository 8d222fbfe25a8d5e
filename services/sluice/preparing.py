"""The prep stage: tokenize, cut into batches, collate, queue for the model (prep thread).

Runs on its own thread so tokenizing batch k+1 overlaps the forward pass of batch k. Queuing
blocks while the run queue is full: that is what stops the pull loop pulling (backpressure).
A job its runner refuses (bad input, too long) is answered at once; an input that breaks the
tokenizer itself is found by encoding one job at a time, so only it fails. Entries that cannot
run at all (malformed, or delivered too often) get their answer or dead letter from `refuse`
and `over_delivered`, called by the pull loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sluice.batching import Batch, cut_batches
from sluice.errors import DeadLettered, InvalidInput, ModelFailure, SluiceError
from sluice.protocol import BadEntry, Job, decode_fields, error_result
from sluice.queue import DeadLetter, Entry, Outcome
from sluice.runners.base import Encoded, Runner
from sluice.running import failed, outcome_of
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


def refuse(model: str, bad: BadEntry, answers: list[Outcome], letters: list[DeadLetter]) -> None:
    """A malformed entry: answered with its error when it has an id, else dead-lettered."""
    if bad.id is None:
        reason = bad.error.message
        letters.append(DeadLetter(bad.entry_id, bad.fields, reason, bad.deliveries, None, bad.lane))
        return
    answers.append(outcome_of(bad, error_result(model, bad.id, bad.error)))


def over_delivered(
    model: str, max_deliveries: int, entry: Entry, decoded: Job | BadEntry
) -> DeadLetter:
    """An entry that keeps coming back (it crashed or stalled its replica) is retired."""
    reason = f"delivered {entry.deliveries} times, over max_deliveries ({max_deliveries})"
    outcome = None
    if decoded.id is not None:
        res = error_result(model, decoded.id, DeadLettered(reason))
        outcome = outcome_of(decoded, res)
    fields, _ = decode_fields(entry.fields)
    return DeadLetter(entry.entry_id, fields, reason, entry.deliveries, outcome, entry.lane)
