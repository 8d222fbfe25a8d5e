"""`sluice submit`'s input: where the texts come from, JSON lines, the empty-text note, and
the feed that hands them to the event loop in chunks."""

from __future__ import annotations

import argparse
import asyncio
import io
from collections.abc import Iterator

import pytest

from sluice.errors import InvalidInput
from sluice.submitting import Feed, Source, checked_model, inputs, source


class Terminal(io.StringIO):
    """stdin as an interactive terminal: nothing is piped in."""

    def isatty(self) -> bool:
        return True


def args(*texts: str, file: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(texts=list(texts), file=file)


def test_texts_come_from_arguments_stdin_or_a_file(tmp_path):
    assert list(source(args("a", "b"), Terminal()).lines) == ["a", "b"]
    piped = io.StringIO("one\ntwo\n\nfour")
    assert list(source(args(), piped).lines) == ["one", "two", "", "four"]
    assert list(source(args("-"), io.StringIO("x\n")).lines) == ["x"]
    path = tmp_path / "texts.txt"
    path.write_text("naïve café\r\nsecond\n", encoding="utf-8")
    src = source(args(file=str(path)), Terminal(), count=True)
    assert (list(src.lines), src.total, src.where) == (
        ["naïve café", "second"],
        2,
        f"{path} line",
    )


def test_no_texts_or_two_sources_are_refused():
    with pytest.raises(InvalidInput, match="no texts"):
        source(args(), Terminal())
    with pytest.raises(InvalidInput, match="not both"):
        source(args("a", file="x.txt"), Terminal())
    with pytest.raises(InvalidInput, match="cannot read --file /no/such/file"):
        source(args(file="/no/such/file"), Terminal())


def test_a_file_that_is_not_utf8_is_refused_with_where(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InvalidInput, match="not UTF-8 text near line"):
        list(source(args(file=str(path)), Terminal()).lines)


def test_json_lines_are_inputs_or_texts_and_bad_ones_say_where():
    lines = ['{"text": "a"}', '"b"', "   ", '{"messages": [{"role": "user", "content": "hi"}]}']
    got = list(inputs(Source("f line", lines, None), jsonl=True))
    assert got == [{"text": "a"}, "b", {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(InvalidInput, match=r"f line 2 is not JSON"):
        list(inputs(Source("f line", ['"ok"', "{nope"], None), jsonl=True))
    with pytest.raises(InvalidInput, match=r"argument 1: a JSON object .* got an array"):
        list(inputs(Source("argument", ["[1, 2]"], None), jsonl=True))


def test_an_empty_text_is_a_job_and_said_once(capsys):
    got = list(inputs(Source("stdin line", ["a", "", "", "b"], None), jsonl=False))
    assert got == ["a", "", "", "b"]  # kept: line N of the output answers line N
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "stdin line 2 is an empty text" in err
    list(inputs(Source("argument", ['{"text": ""}'], None), jsonl=True))
    assert "argument 1 is an empty text" in capsys.readouterr().err


def test_checked_model_suggests_the_lowercase_name():
    assert checked_model("minilm") == "minilm"
    with pytest.raises(InvalidInput, match="'minilm'\\?"):
        checked_model("MiniLM")
    with pytest.raises(InvalidInput, match="must match") as bad:
        checked_model("no spaces")
    assert "?" not in bad.value.message


def test_the_feed_hands_over_chunks_then_the_error_after_the_lines_before_it():
    def items() -> Iterator[str]:
        yield from ["a", "b", "c"]
        raise InvalidInput("line 4 is bad")

    async def scenario() -> None:
        feed = Feed(items(), backlog=8)
        taken: list[str] = []
        with pytest.raises(InvalidInput, match="line 4"):
            while chunk := await feed.chunk(2):
                assert 1 <= len(chunk) <= 2
                taken.extend(str(x) for x in chunk)
        assert taken == ["a", "b", "c"]
        assert await feed.chunk(2) == []
        feed.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_feed_reads_no_further_than_its_backlog():
    read: list[int] = []

    def items() -> Iterator[str]:
        for i in range(1000):
            read.append(i)
            yield str(i)

    async def scenario() -> None:
        feed = Feed(items(), backlog=4)
        assert await feed.chunk(2)
        await asyncio.sleep(0.2)  # the thread runs on as far as it may; a fixed bound follows
        assert len(read) <= 2 + 4 + 1, len(read)
        feed.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))
