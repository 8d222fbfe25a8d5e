"""The dynamic batcher: how many entries to pull, how long to wait, where to cut.

Two decisions live here and nowhere else:

* **Collect** (`Collector`): one XREADGROUP pulls up to `max_batch_size` entries. A deep queue
  fills the batch in that one call and never waits. A shallow one gets a partial batch, which
  may wait for more, but only while the model is busy: an idle model runs what it has at once,
  since waiting then adds latency and buys nothing. While it is busy, the batch waits up to
  `max_wait_ms`, or until shortly before the running batch is expected to end, whichever is
  later: it could not run sooner, and a fuller batch is cheaper per job. (Without this, near
  saturation each batch held only the jobs that arrived during the previous forward pass.)
* **Cut** (`cut_batches`): encoded jobs are sorted by length (less padding) and cut into model
  batches of at most `max_batch_size` jobs and `max_batch_tokens` padded tokens; the worker
  cuts each priority lane apart, so a high job never rides in a normal batch that queues last.

Priority is the pull's (queue.StreamQueue.pull empties the high lane first) and the run
queue's (running.RunQueue runs high batches next); expired jobs are dropped before the model
sees them, both when pulled and again just before their batch runs (running.ModelStage).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from sluice.protocol import NORMAL
from sluice.queue import Entry
from sluice.runners.base import Encoded
from sluice.settings import ModelSettings

PullFn = Callable[[int, int | None], Awaitable[list[Entry]]]
# Share of the running batch's expected time left that a partial batch may spend collecting:
# the rest covers tokenizing and collating it before the model is free.
FILL_SHARE = 0.75


@dataclass(slots=True)
class Batch:
    """One model batch: encoded jobs, the runner's prepared tensors, and when it was cut."""

    items: list[Encoded]
    prepared: Any = None
    cut_ms: float = field(default_factory=lambda: time.time() * 1000)

    @property
    def lane(self) -> int:
        """The most urgent lane among its jobs: where the batch queues for the model."""
        return min((i.job.lane for i in self.items), default=NORMAL)

    @property
    def padded_tokens(self) -> int:
        return len(self.items) * max((i.cost for i in self.items), default=0)


def cut_batches(
    items: Sequence[Encoded], max_batch_size: int, max_tokens: int
) -> list[list[Encoded]]:
    """Sorts by cost and cuts greedily; a single job over the token budget runs alone."""
    if max_batch_size < 1 or max_tokens < 1:
        raise ValueError(f"limits must be positive, got {max_batch_size=} {max_tokens=}")
    batches: list[list[Encoded]] = []
    current: list[Encoded] = []
    for item in sorted(items, key=lambda i: i.cost):
        # Sorted ascending, so the newcomer is the widest: padded cost is (n + 1) * its cost.
        if current and (
            len(current) >= max_batch_size or (len(current) + 1) * item.cost > max_tokens
        ):
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


class Collector:
    """Pulls the entries of the next batch, waiting for stragglers only while it pays."""

    def __init__(self, pull: PullFn, settings: ModelSettings, block_ms: int) -> None:
        self._pull = pull
        self._max = settings.max_batch_size
        self._max_wait_s = settings.max_wait_ms / 1000
        self._block_ms = block_ms

    async def collect(self, time_left_s: Callable[[], float]) -> list[Entry]:
        """Up to `max_batch_size` entries; blocks up to `block_ms` when the queue is empty.

        `time_left_s` is how long the model is expected to stay busy with what it runs now
        (0: idle). A partial batch waits for more only while it is above 0, and for at most
        `max_wait_ms` or FILL_SHARE of that time, whichever is longer: the batch could not run
        sooner anyway, and the rest of the time is left for tokenizing it.
        """
        entries = await self._pull(self._max, self._block_ms)
        if not entries or len(entries) >= self._max or self._max_wait_s <= 0:
            return entries
        deadline = time.monotonic() + max(self._max_wait_s, FILL_SHARE * time_left_s())
        while len(entries) < self._max and time_left_s() > 0:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms < 1:
                break
            try:
                more = await self._pull(self._max - len(entries), remaining_ms)
            except (RedisError, OSError):
                break  # run what was pulled; the pull loop meets the outage on its next read
            if not more:
                break
            entries.extend(more)
        return entries
