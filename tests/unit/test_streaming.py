"""The producer's view of a streamed generation (streaming.Joiner): text shown once and in
order, whatever the replicas pushed: duplicates, gaps, a retry that starts again from the
beginning, a retry that sampled something else, a final result that disagrees."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from sluice.errors import InvalidParams
from sluice.protocol import Result
from sluice.streaming import Delta, Joiner, TokenStream

PIECES = ["The", " capital", " of", " France", " is", " Paris", "."]
TEXT = "".join(PIECES)


def deltas(pieces: list[str], attempt: int = 1) -> list[Delta]:
    return [Delta(seq, text, attempt) for seq, text in enumerate(pieces)]


def shown(joiner: Joiner, items: list[Delta], final: str | None = TEXT) -> str:
    out = "".join(joiner.add(d) for d in items)
    return out + (joiner.finish(final) if final is not None else "")


def test_one_attempt_in_order_shows_each_piece_as_it_comes() -> None:
    joiner = Joiner()
    assert [joiner.add(d) for d in deltas(PIECES)] == PIECES
    assert joiner.finish(TEXT) == "" and not joiner.diverged


def test_duplicates_are_shown_once() -> None:
    items = deltas(PIECES)
    doubled = [d for d in items for _ in range(2)]
    assert shown(Joiner(), doubled) == TEXT


def test_a_gap_stops_that_attempt_and_the_result_fills_in() -> None:
    items = deltas(PIECES)
    joiner = Joiner()
    assert "".join(joiner.add(d) for d in items[:3] + items[4:]) == "".join(PIECES[:3])
    assert joiner.finish(TEXT) == "".join(PIECES[3:])


def test_a_retry_from_the_start_shows_only_what_is_new() -> None:
    first = deltas(PIECES[:4], attempt=1)  # the replica died after " France"
    second = deltas(PIECES, attempt=2)
    joiner = Joiner()
    out = [joiner.add(d) for d in first + second]
    assert "".join(out) == TEXT
    assert out[4:8] == ["", "", "", ""], "the retry's first pieces were shown already"
    assert joiner.finish(TEXT) == ""


def test_interleaved_attempts_never_show_text_twice() -> None:
    rng = random.Random(0)
    for _ in range(500):
        cut = rng.randrange(len(PIECES))
        lists = [deltas(PIECES[:cut], 1), deltas(PIECES, 2)]
        # Any interleaving that keeps each attempt's own order (one replica pushes its
        # deltas in turn), with a few duplicated pushes.
        merged: list[Delta] = []
        while any(lists):
            source = rng.choice([part for part in lists if part])
            merged.append(source.pop(0))
            if rng.random() < 0.1:
                merged.append(merged[-1])
        joiner = Joiner()
        out = [joiner.add(d) for d in merged]
        assert "".join(out) + joiner.finish(TEXT) == TEXT
        assert all(TEXT.startswith("".join(out[: i + 1])) for i in range(len(out)))


def test_every_split_of_the_text_into_two_attempts_shows_it_once() -> None:
    for cut, other in itertools.product(range(len(PIECES) + 1), range(len(PIECES) + 1)):
        items = deltas(PIECES[:cut], 1) + deltas(PIECES[:other], 2)
        assert shown(Joiner(), items) == TEXT


def test_a_retry_that_sampled_differently_shows_nothing_it_cannot_take_back() -> None:
    joiner = Joiner()
    first = "".join(joiner.add(d) for d in deltas(["The", " capital"], 1))
    other = ["A", " city"]
    assert "".join(joiner.add(d) for d in deltas(other, 2)) == ""
    assert joiner.finish("A city.") == "" and joiner.diverged
    assert first == "The capital"


def test_the_token_stream_ends_with_the_result_and_raises_an_error_result() -> None:
    async def run(final: Result, pieces: list[str]) -> tuple[list[str], TokenStream]:
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        released: list[bool] = []
        stream = TokenStream("j", queue, future, _never, lambda: released.append(True))

        async def feed() -> None:
            for d in deltas(pieces):
                queue.put_nowait(d)
                await asyncio.sleep(0.01)
            future.set_result(final)

        feeder = asyncio.create_task(feed())
        got = []
        try:
            async for text in stream:
                got.append(text)
        finally:
            await feeder
            assert released == [True]
        return got, stream

    ok = Result("j", "m", "ok", output={"text": TEXT, "finish_reason": "eos"})
    got, stream = asyncio.run(run(ok, PIECES[:5]))
    assert got == [*PIECES[:5], "".join(PIECES[5:])] and stream.result == ok

    bad = Result("j", "m", "error", error={"code": "invalid_params", "message": "no"})
    with pytest.raises(InvalidParams):
        asyncio.run(run(bad, []))


async def _never() -> Result:
    raise AssertionError("not cancelled")


def test_a_stream_nobody_iterates_is_released_when_its_result_comes() -> None:
    async def run() -> list[str]:
        released: list[str] = []
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        TokenStream("j", asyncio.Queue(), future, _never, lambda: released.append("j"))
        late: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        TokenStream("k", asyncio.Queue(), late, _never, lambda: released.append("k"))
        future.set_result(Result("j", "m", "ok", output={"text": ""}))
        late.set_exception(TimeoutError("nobody waited"))  # retrieved: no warning at exit
        await asyncio.sleep(0)
        return released

    assert sorted(asyncio.run(run())) == ["j", "k"]


def test_cancelling_a_stream_releases_it_once() -> None:
    async def run() -> list[str]:
        released: list[str] = []
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        async def cancel() -> Result:
            return Result("j", "m", "cancelled")

        stream = TokenStream("j", asyncio.Queue(), future, cancel, lambda: released.append("j"))
        assert (await stream.cancel()).status == "cancelled"
        await asyncio.sleep(0)
        return released

    assert asyncio.run(run()) == ["j"]
