"""The batcher: cut by size and token budget, sorted by length; wait only while it pays."""

from __future__ import annotations

import asyncio

import pytest

from sluice.batching import Collector, cut_batches
from sluice.protocol import Job
from sluice.queue import Entry
from sluice.runners.base import Encoded
from sluice.settings import ModelSettings


def item(cost: int) -> Encoded:
    return Encoded(Job(entry_id="1-0", id=f"j{cost}", input={}, params={}), cost, None)


def test_sorted_by_length_and_cut_by_size():
    batches = cut_batches([item(c) for c in (5, 1, 4, 2, 3)], max_batch_size=2, max_tokens=1000)
    assert [[i.cost for i in b] for b in batches] == [[1, 2], [3, 4], [5]]


def test_cut_by_padded_token_budget():
    # Padded cost is batch size times the widest item: 3 * 10 > 25 cuts after two.
    batches = cut_batches([item(10)] * 3 + [item(2)], max_batch_size=64, max_tokens=25)
    assert [[i.cost for i in b] for b in batches] == [[2, 10], [10, 10]]


def test_an_item_over_budget_runs_alone():
    batches = cut_batches([item(50), item(1)], max_batch_size=64, max_tokens=10)
    assert [[i.cost for i in b] for b in batches] == [[1], [50]]


def test_limits_are_validated():
    with pytest.raises(ValueError, match="limits must be positive"):
        cut_batches([item(1)], max_batch_size=0, max_tokens=10)


class FakeStream:
    """Stands in for the stream's read side only: the batcher's logic, not Redis, is tested."""

    def __init__(self, chunks: list[int]) -> None:
        self.chunks = chunks
        self.calls: list[tuple[int, int | None]] = []

    async def pull(self, count: int, block_ms: int | None) -> list[Entry]:
        self.calls.append((count, block_ms))
        n = min(count, self.chunks.pop(0)) if self.chunks else 0
        return [Entry(f"1-{i}", {}) for i in range(n)]


def collect(
    chunks: list[int], busy: bool, time_left_s: float = 0.01, **settings: float
) -> tuple[int, FakeStream]:
    stream = FakeStream(chunks)
    collector = Collector(stream.pull, ModelSettings(max_batch_size=8, **settings), block_ms=1000)
    entries = asyncio.run(collector.collect(lambda: time_left_s if busy else 0.0))
    return len(entries), stream


def test_a_deep_queue_fills_the_batch_in_one_pull():
    n, stream = collect([8, 8], busy=True)
    assert n == 8 and len(stream.calls) == 1


def test_an_idle_model_never_waits_for_stragglers():
    n, stream = collect([3, 5], busy=False)
    assert n == 3 and len(stream.calls) == 1


def test_a_busy_model_lets_a_partial_batch_wait_for_more():
    n, stream = collect([3, 2, 3], busy=True, max_wait_ms=50)
    assert n == 8
    assert stream.calls[0] == (8, 1000)
    assert stream.calls[1][0] == 5 and stream.calls[1][1] is not None
    assert stream.calls[1][1] <= 50


def test_no_wait_when_max_wait_is_zero():
    n, stream = collect([3, 5], busy=True, max_wait_ms=0)
    assert n == 3 and len(stream.calls) == 1


def test_a_long_forward_lets_a_partial_batch_fill_until_shortly_before_it_ends():
    # 200 ms still to run: the batch may collect for 150 ms (FILL_SHARE), not just 5 ms.
    n, stream = collect([3, 2, 3], busy=True, time_left_s=0.2, max_wait_ms=5)
    assert n == 8
    assert 140 <= stream.calls[1][1] <= 150, stream.calls
