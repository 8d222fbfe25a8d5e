"""A generation job's text as it is made, on the producer's side (the SDK and the gateway).

A replica pushes a streaming job's text deltas to the job's `reply_to` stream, numbered
(`seq`) within each delivery (`attempt`), and its one final result after the last of them
(docs/protocol.md). Deltas are best effort: a push can fail, and a job retried after a replica
died is generated again from the start, by another attempt. The final result is the one answer
that counts. So a reader must never show text twice, nor text the final answer does not have:

* `Joiner` keeps, per attempt, the text its unbroken run of deltas spells, and passes on only
  what extends the text already shown. A later attempt shows nothing until it has regenerated
  what was shown, and then goes on from there (with the same seed, greedy or sampled, it makes
  the same text). An attempt with a gap in its numbering shows nothing more.
* At the end, `Joiner.finish` shows what the final text has beyond what was shown. Should the
  shown text not be a prefix of the final one (a retry that sampled differently, without a
  seed), nothing more is shown and `diverged` says so.

`TokenStream` is the iterator the SDK hands out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sluice.protocol import Result, raise_for_status

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delta:
    """One streamed text delta, as a replica pushed it."""

    seq: int  # 0, 1, ... within one attempt
    text: str
    attempt: int  # the delivery that made it (1: the first)


@dataclass(slots=True)
class _Attempt:
    text: str = ""
    next_seq: int = 0
    broken: bool = False  # a delta went missing: this attempt's text is no longer known


@dataclass(slots=True)
class Joiner:
    """The text to show from deltas of any attempts in any order of arrival (see above)."""

    shown: str = ""
    diverged: bool = False
    _attempts: dict[int, _Attempt] = field(default_factory=dict)

    def add(self, delta: Delta) -> str:
        """The new text to show because of this delta ("" for none)."""
        state = self._attempts.setdefault(delta.attempt, _Attempt())
        if state.broken or delta.seq < state.next_seq:
            return ""  # a duplicate push, or an attempt whose text is no longer known
        if delta.seq > state.next_seq:
            state.broken = True
            return ""
        state.text += delta.text
        state.next_seq += 1
        return self._extend(state.text)

    def finish(self, final_text: str) -> str:
        """The rest of the final text, once its result came."""
        if not final_text.startswith(self.shown):
            self.diverged = True
            log.warning(
                "a retried job's final text differs from the text already streamed: the "
                "rest is not streamed (seed sampled jobs to make retries repeatable)"
            )
            return ""
        return self._extend(final_text)

    def _extend(self, text: str) -> str:
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new


class TokenStream:
    """The text deltas of one generation job, as an async iterator of strings.

    The iteration ends after the last delta, when the job's final result has come; then
    `result` holds it (its `output` has the whole text, `finish_reason` and `usage`). A result
    that is not `ok` raises its typed error, as `AsyncClient.result` does. `cancel()` ends a job
    nobody will read any more: the replica stops generating it.
    """

    def __init__(
        self,
        job_id: str,
        deltas: asyncio.Queue[Delta],
        final: Awaitable[Result],
        cancel: Callable[[], Awaitable[Result]],
        release: Callable[[], None],
    ) -> None:
        self.job_id = job_id
        self.result: Result | None = None
        self.joiner = Joiner()
        self._deltas = deltas
        self._final = asyncio.ensure_future(final)
        self._cancel = cancel
        self._release_stream: Callable[[], None] | None = release
        # Released (its deltas no longer routed here) once the result is in, iterated or not:
        # a stream nobody reads must not hold a queue in the client for ever.
        self._final.add_done_callback(self._settled)

    def _release(self) -> None:
        release, self._release_stream = self._release_stream, None
        if release is not None:
            release()

    def _settled(self, final: asyncio.Future[Result]) -> None:
        if not final.cancelled():
            final.exception()  # retrieved: a timeout nobody iterated to see is not an error
        self._release()

    @property
    def diverged(self) -> bool:
        """True if a retry's text differed from what was streamed (see the module doc)."""
        return self.joiner.diverged

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        try:
            while not self._final.done():
                getter = asyncio.ensure_future(self._deltas.get())
                try:
                    await asyncio.wait({getter, self._final}, return_when="FIRST_COMPLETED")
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    if text := self.joiner.add(getter.result()):
                        yield text
            # Deltas are read before the result that follows them on the reply stream.
            while not self._deltas.empty():
                if text := self.joiner.add(self._deltas.get_nowait()):
                    yield text
            self.result = raise_for_status(self._final.result())
            output = self.result.output if isinstance(self.result.output, dict) else {}
            if text := self.joiner.finish(str(output.get("text", ""))):
                yield text
        finally:
            self._release()
            if not self._final.done():
                self._final.cancel()

    async def cancel(self) -> Result:
        """Cancels the job unless it has its final result already; answers the final result."""
        if self._final.done() and not self._final.cancelled() and not self._final.exception():
            return self._final.result()
        try:
            return await self._cancel()
        finally:
            self._release()
            self._final.cancel()
