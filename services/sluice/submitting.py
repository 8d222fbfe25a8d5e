"""`sluice submit`: texts from the arguments, stdin or a file, queued in chunks, each result
printed as it comes, in input order.

The input is read on a thread of its own (`Feed`) and queued a chunk at a time, one round trip
each (`AsyncClient.submit_many`), while a second coroutine prints the answered chunks in order.
At most `--in-flight` jobs are queued and not yet printed (`Window`), so a file of any size goes
through in bounded memory and takes no more of the model's queue than that; line N of the
output is the result of input line N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from redis.exceptions import RedisError
from tqdm import tqdm

from sluice.client import AsyncClient, JobInput
from sluice.connection import AsyncRedis
from sluice.errors import InvalidInput, Overloaded, UnknownModel
from sluice.protocol import MODELS_KEY, PRIORITIES, Result, check_model_name
from sluice.settings import MODEL_NAME_RE, Settings

CHUNK = 64  # jobs per submit round trip: one batch of a model at the default max_batch_size
RETRY_PAUSE_MAX_S = 2.0
URL_HELP = "default: SLUICE_REDIS_URL or redis://127.0.0.1:6379/0"
EMPTY_TEXT = (
    "an empty text is a job like any other: the model sees only its special tokens, so every "
    "empty text gets the same answer"
)
DESCRIPTION = f"""\
Submits one job per text and prints each result as it comes, in input order.

Texts come from the TEXT arguments; from stdin with '-' (or with no TEXT when stdin is a
pipe or a file); or from --file PATH. Files and stdin hold one text per line. With
--jsonl, each line (or TEXT) is JSON: an object is the job's input as it is (for example
{{"messages": [...]}} for a generate model), a string is the text; blank lines are skipped.

Note: {EMPTY_TEXT} (a note on stderr says when there is one).

Exit status: 0 when every job ended ok; 1 when any did not (its line says why); non-zero
with one line "error [code]: ..." on stderr when the command itself failed."""


def add_command(sub: Any) -> None:
    """Adds `sluice submit` to the CLI's subcommands."""
    p = sub.add_parser(
        "submit",
        help="submit texts (arguments, stdin, a file) to a model; print the results",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name, e.g. minilm")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="one job per text ('-': read stdin)")
    p.add_argument(
        "--file", metavar="PATH", help="read the texts from PATH, one a line ('-': stdin)"
    )
    p.add_argument(
        "--jsonl", action="store_true", help="each text is JSON: the job's input, or a string"
    )
    p.add_argument("--redis-url", help=URL_HELP)
    p.add_argument("--priority", choices=PRIORITIES, default="normal", help="lane (normal)")
    p.add_argument(
        "--deadline-s", type=float, default=None, help="not started within this, it expires"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for each result, from its submit (60)",
    )
    p.add_argument(
        "--in-flight",
        type=_positive,
        default=1024,
        metavar="N",
        help="jobs queued and not yet printed, at most (1024)",
    )
    p.add_argument("--no-wait", action="store_true", help="print the ids and return")
    p.add_argument("--json", action="store_true", help="print each result as raw JSON")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def checked_model(name: str) -> str:
    """The model name, or `InvalidInput` saying what a name looks like (and the likely one)."""
    try:
        return check_model_name(name)
    except ValueError as exc:
        lower = name.lower()
        hint = f"; names are lowercase: {lower!r}?" if MODEL_NAME_RE.fullmatch(lower) else ""
        raise InvalidInput(f"{exc}{hint}") from exc


async def with_registered(redis: AsyncRedis, message: str) -> str:
    """`message`, plus the models this Redis has registered: a typo's right name is there."""
    try:
        members: Any = await redis.smembers(MODELS_KEY)
    except RedisError:
        return message  # a tenant's user may not read the models set: the message stands
    names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    return f"{message}; registered here: {', '.join(names) if names else 'none yet'}"


# -- where the texts come from ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """The texts: where they are, for messages ("stdin line"), their lines, and how many
    there are when that is known cheaply (for the progress bar)."""

    where: str
    lines: Iterable[str]
    total: int | None


def source(args: argparse.Namespace, stdin: IO[str] | None, *, count: bool = False) -> Source:
    """The texts the arguments name: TEXTs, stdin, or a file (`InvalidInput` if none)."""
    texts: list[str] = args.texts
    path: str | None = args.file
    if path is not None and texts:
        raise InvalidInput("give TEXT arguments or --file PATH, not both")
    if texts == ["-"]:
        path, texts = "-", []
    if path is None and not texts:
        if stdin is None or stdin.isatty():
            raise InvalidInput(
                "no texts: give them as arguments, pipe them in (one a line, or '-'), "
                "or name a file with --file PATH"
            )
        path = "-"
    if path is None:
        return Source("argument", texts, len(texts))
    if path == "-":
        if stdin is None:
            raise InvalidInput("no stdin to read the texts from")
        # UTF-8 whatever the locale says: the texts go on the wire as JSON.
        return Source("stdin line", _lines(_utf8(stdin), "stdin"), None)
    try:
        handle = open(path, encoding="utf-8")  # closed by _lines, once read to the end
    except OSError as exc:
        raise InvalidInput(f"cannot read --file {path}: {exc.strerror or exc}") from exc
    total = _count_lines(Path(path)) if count and Path(path).is_file() else None
    return Source(f"{path} line", _lines(handle, path), total)


def _utf8(stream: IO[str]) -> IO[str]:
    """The stream on a file descriptor and buffer of its own: the reader thread may still
    block in a read of it when the command ends, and the interpreter, closing `sys.stdin` at
    exit, would wait for that read's lock forever (and abort)."""
    try:
        fd = os.dup(stream.fileno())
    except (OSError, ValueError):
        return stream  # not a real file (a test's StringIO): nothing to close under a read
    return open(fd, encoding="utf-8", closefd=True)


def _lines(stream: IO[str], name: str) -> Iterator[str]:
    number = 0
    with stream:
        try:
            for line in stream:
                number += 1
                yield line.removesuffix("\n")
        except UnicodeDecodeError as exc:
            # Decoding runs a block ahead of the lines: the number is where it was reading.
            raise InvalidInput(f"{name} is not UTF-8 text near line {number + 1}: {exc}") from exc


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # a last line without its newline


def inputs(src: Source, jsonl: bool) -> Iterator[JobInput]:
    """Each text's job input; says once (stderr) that an empty text is a job too."""
    noted = False
    for number, line in enumerate(src.lines, 1):
        where = f"{src.where} {number}"
        if jsonl and not line.strip():
            continue
        item = _parsed(line, where) if jsonl else line
        if not noted and (item == "" or (isinstance(item, dict) and item.get("text") == "")):
            print(f"note: {where} is an empty text; {EMPTY_TEXT}", file=sys.stderr)
            noted = True
        yield item


_JSON_TYPES = {"list": "an array", "int": "a number", "float": "a number", "bool": "a boolean"}


def _parsed(text: str, where: str) -> JobInput:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{where} is not JSON ({exc}): {text[:60]!r}") from exc
    if isinstance(value, str | dict):
        return value
    kind = _JSON_TYPES.get(type(value).__name__, "null")
    raise InvalidInput(f"{where}: a JSON object (the job's input) or string (the text), got {kind}")


# -- reading, queuing, printing ---------------------------------------------------------------


class _End:
    """The end of the input, as the reader thread hands it over."""


END = _End()


class Feed:
    """The job inputs, read on a daemon thread and handed to the event loop as they come.

    A pipe may block as long as its writer likes (`tail -f texts | sluice submit ...`); read on
    the loop, it would hold up the printing of jobs already answered. A chunk is whatever has
    been read, up to its size, so a slow pipe's lines go out at once and a file's in full
    chunks (the thread reads on while a chunk is being queued). The thread waits when
    `backlog` inputs are read and not taken, so a file is never read whole into memory.
    """

    def __init__(self, items: Iterator[JobInput], backlog: int) -> None:
        self._items = items
        self._room = threading.Semaphore(backlog)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[JobInput | Exception | _End] = asyncio.Queue()
        self._held: JobInput | Exception | _End | None = None  # None: nothing held
        self._ended = False
        self._stopped = False
        self._thread = threading.Thread(target=self._read, name="sluice-submit-input", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in self._items:
                self._room.acquire()
                if self._stopped:
                    return
                self._hand(item)
        except Exception as exc:  # a bad line, or a read that failed: raised on the loop
            self._hand(exc)
            return
        self._hand(END)

    def _hand(self, item: JobInput | Exception | _End) -> None:
        if self._stopped:
            return
        # The loop may close between the check and the call (the command ended): then nobody
        # reads any more, and there is nothing to hand over.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def stop(self) -> None:
        """Lets a thread waiting for room end; one blocked reading a pipe stays, a daemon."""
        self._stopped = True
        self._room.release()

    async def chunk(self, size: int) -> list[JobInput]:
        """The next inputs: at least one, at most `size`, those read so far; [] at the end.
        Raises the input's `InvalidInput` once the inputs before it are taken."""
        if self._ended:
            return []
        items: list[JobInput] = []
        item = self._held if self._held is not None else await self._queue.get()
        self._held = None
        while True:
            if isinstance(item, _End | Exception):
                if items:
                    self._held = item  # the end, or the error, comes with the next chunk
                    return items
                self._ended = True
                if isinstance(item, _End):
                    return []
                raise item
            items.append(item)
            self._room.release()
            if len(items) >= size or self._queue.empty():
                return items
            item = self._queue.get_nowait()


class Window:
    """At most `limit` jobs queued and not yet printed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    async def take(self, count: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + count <= self.limit)
            self.used += count

    async def give(self, count: int) -> None:
        async with self._freed:
            self.used -= count
            self._freed.notify_all()


@dataclass(frozen=True, slots=True)
class Options:
    model: str
    priority: str
    deadline_s: float | None
    timeout_s: float
    in_flight: int
    no_wait: bool


@dataclass(frozen=True, slots=True)
class Chunk:
    """Jobs queued in one round trip, and the task that waits for their results."""

    inputs: list[JobInput]
    ids: list[str]
    answered: asyncio.Task[list[Result]] | None  # None: --no-wait


class Printer:
    """Prints results (or ids) and counts the jobs that did not end `ok`."""

    def __init__(self, as_json: bool, bar: Any | None) -> None:
        self.as_json = as_json
        self.bar = bar
        self.failed = 0
        # A bar and the results on one terminal: through tqdm, which redraws the bar below.
        self._through_bar = bar is not None and sys.stdout.isatty()

    def show(self, chunk: Chunk, results: list[Result] | None) -> None:
        if results is None:
            lines = chunk.ids
        else:
            lines = [self._line(item, res) for item, res in zip(chunk.inputs, results, strict=True)]
        for line in lines:
            if self._through_bar:
                tqdm.write(line, file=sys.stdout)
            else:
                print(line)
        sys.stdout.flush()  # a reader at the other end of a pipe sees each chunk as it comes
        if self.bar is not None:
            self.bar.update(len(lines))

    def _line(self, item: JobInput, res: Result) -> str:
        self.failed += not res.ok
        if self.as_json:
            return res.to_json().decode()
        if res.ok and isinstance(res.output, list):
            head = ", ".join(f"{v:.4f}" for v in res.output[:4])
            shown = item if isinstance(item, str) else orjson.dumps(item).decode()
            return (
                f"{res.id} ok dim={len(res.output)} [{head}, ...] "
                f"{res.timings.get('total_ms', 0):.1f} ms  {shown[:50]!r}"
            )
        return f"{res.id} {res.status} {json.dumps(res.error or res.output, ensure_ascii=False)}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    model = checked_model(args.model)
    show_bar = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    src = source(args, sys.stdin, count=show_bar)
    options = Options(
        model=model,
        priority=args.priority,
        deadline_s=args.deadline_s,
        timeout_s=args.timeout,
        in_flight=args.in_flight,
        no_wait=args.no_wait,
    )
    bar = None
    if show_bar:
        # Shown after a second only (unless asked for): a few texts need no bar.
        delay_s = 0.0 if args.progress else 1.0
        desc = "queued" if args.no_wait else "answered"
        bar = tqdm(total=src.total, unit="job", desc=desc, file=sys.stderr, delay=delay_s)
    printer = Printer(args.json, bar)
    url = args.redis_url or settings.redis_url
    try:
        asyncio.run(_submit(url, options, inputs(src, args.jsonl), printer))
    finally:
        if bar is not None:
            bar.close()
    return 1 if printer.failed else 0


async def _submit(url: str, options: Options, items: Iterator[JobInput], printer: Printer) -> None:
    async with AsyncClient(url) as client:
        submitted = await submit_all(client, options, items, printer)
    if not submitted:
        raise InvalidInput("no texts: the input was empty")


async def submit_all(
    client: AsyncClient, options: Options, items: Iterator[JobInput], printer: Printer
) -> int:
    """Queues every input and prints each chunk's results in order; returns how many were
    queued. A bad input line, a full queue or an unknown model stops the queuing, but the
    jobs queued before it are still waited for and printed before the error is raised."""
    size = min(CHUNK, options.in_flight)
    feed = Feed(items, backlog=2 * size)
    window = Window(options.in_flight)
    chunks: asyncio.Queue[Chunk | None] = asyncio.Queue()
    queuing = asyncio.create_task(_queue_all(client, options, feed, size, window, chunks))
    try:
        while (chunk := await chunks.get()) is not None:
            printer.show(chunk, None if chunk.answered is None else await chunk.answered)
            await window.give(len(chunk.ids))
        return await queuing
    finally:
        feed.stop()
        queuing.cancel()
        owned: list[asyncio.Future[Any]] = [queuing]
        while not chunks.empty():
            if (left := chunks.get_nowait()) is not None and left.answered is not None:
                left.answered.cancel()
                owned.append(left.answered)
        await asyncio.gather(*owned, return_exceptions=True)


async def _queue_all(
    client: AsyncClient,
    options: Options,
    feed: Feed,
    size: int,
    window: Window,
    chunks: asyncio.Queue[Chunk | None],
) -> int:
    submitted = 0
    try:
        while inputs := await feed.chunk(size):
            await window.take(len(inputs))
            ids = await _queue(client, options, inputs)
            submitted += len(ids)
            answered = None
            if not options.no_wait:
                answered = asyncio.create_task(client.wait(ids, options.timeout_s))
            chunks.put_nowait(Chunk(inputs, ids, answered))
    finally:
        chunks.put_nowait(None)  # the printer ends after the chunks queued so far
    return submitted


async def _queue(client: AsyncClient, options: Options, inputs: list[JobInput]) -> list[str]:
    """Queues one chunk. Jobs that a full queue refused are submitted again under the same ids
    (nothing was queued for them) until `timeout_s` has passed, then `Overloaded`."""
    ids = [uuid.uuid4().hex for _ in inputs]
    todo = dict(zip(ids, inputs, strict=True))
    give_up = time.monotonic() + options.timeout_s
    pause_s = 0.1
    while True:
        try:
            await client.submit_many(
                options.model,
                list(todo.values()),
                ids=list(todo),
                priority=options.priority,
                deadline_s=options.deadline_s,
            )
            return ids
        except UnknownModel as exc:
            message = await with_registered(client.redis, exc.message)
            raise UnknownModel(message, job_id=exc.job_id) from exc
        except Overloaded as exc:
            left_s = give_up - time.monotonic()
            if left_s <= 0:
                raise Overloaded(
                    f"{exc.message} (still full after {options.timeout_s:g}s of retries)",
                    job_id=exc.job_id,
                ) from exc
            todo = {job_id: todo[job_id] for job_id in exc.rejected}
            await asyncio.sleep(min(pause_s, left_s))
            pause_s = min(2 * pause_s, RETRY_PAUSE_MAX_S)
