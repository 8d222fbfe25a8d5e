"""OpenAI's chat and completions API over the queue: `POST /v1/chat/completions`,
`POST /v1/completions` and `GET /v1/models` (docs/gateway.md).

A request is one generation job, queued through admission like any other and run with the
model's continuous batching. Without `stream` the route waits for the job's result. With
`stream`, the job's text deltas come back on the gateway's reply stream (the SDK's
`TokenStream`) and go out as Server-Sent Events in OpenAI's chunk shape, ending `data: [DONE]`.
The response starts with the first token, so a job the replica refuses (a bad chat, too many
tokens) is answered with a plain HTTP error, as a non-streamed one is. A client that hangs up
before its answer is whole has its job cancelled; the replica then drops it from the running
batch (worker.py, `_cancel_loop`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sluice.errors import Internal, JobExpired, ResultTimeout, SluiceError
from sluice.gateway.broker import Broker
from sluice.gateway.chat_bodies import ChatCompletionRequest, GenerationRequest
from sluice.gateway.http import error_body, unless_hung_up
from sluice.protocol import Result, raise_for_status
from sluice.streaming import TokenStream

# The replica's finish reasons in OpenAI's words: an eos token and a stop string both "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True, slots=True)
class Reply:
    """The shape of one request's answers: a chat's or a text completion's."""

    kind: Literal["chat", "text"]
    id: str
    model: str
    created: int

    @staticmethod
    def to(request: GenerationRequest, job_id: str) -> Reply:
        chat = isinstance(request, ChatCompletionRequest)
        prefix = "chatcmpl" if chat else "cmpl"
        kind: Literal["chat", "text"] = "chat" if chat else "text"
        return Reply(kind, f"{prefix}-{job_id}", request.model, int(time.time()))

    def body(self, result: Result) -> dict[str, Any]:
        """The non-streamed response for an ok result."""
        output = result.output
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": FINISH_REASONS.get(output["finish_reason"], "stop"),
            "logprobs": None,
        }
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": output["text"]}
        else:
            choice["text"] = output["text"]
        return {**self._head(""), "choices": [choice], "usage": usage(result)}

    def chunk(self, text: str | None, *, finish: str | None = None, role: bool = False) -> bytes:
        """One SSE event with one choice: text, or (text None) just the finish reason."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return event({**self._head(".chunk"), "choices": [choice]})

    def usage_chunk(self, result: Result) -> bytes:
        """The last event of `stream_options.include_usage`: no choices, the usage."""
        return event({**self._head(".chunk"), "choices": [], "usage": usage(result)})

    def _head(self, suffix: str) -> dict[str, Any]:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        # OpenAI names a text completion's chunks "text_completion" as well.
        obj = kind + suffix if self.kind == "chat" else kind
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(result: Result) -> dict[str, int]:
    """Token counts by the model's own tokenizer (the prompt after its chat template)."""
    counts = result.output.get("usage", {})
    prompt = int(counts.get("prompt_tokens", 0))
    completion = int(counts.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def finished(result: Result) -> Result:
    """The ok result, or its error raised, as the gateway answers it (see `gateway_error`)."""
    try:
        return raise_for_status(result)
    except SluiceError as err:
        raise gateway_error(err) from err


def gateway_error(err: SluiceError) -> SluiceError:
    """A job's error as an HTTP caller meets it: a job that expired unstarted is the
    request's own timeout (504), streamed or not."""
    if isinstance(err, JobExpired):
        return ResultTimeout("not started within the request's timeout", job_id=err.job_id)
    return err


async def complete(broker: Broker, request: GenerationRequest, http: Request) -> Response:
    """A non-streamed answer: the job's whole text, once its result came."""
    result = finished(await unless_hung_up(http, broker.complete(request)))
    body = Reply.to(request, result.id).body(result)
    return Response(orjson.dumps(body), media_type="application/json")


async def stream(broker: Broker, request: GenerationRequest, http: Request) -> Response:
    """A streamed answer, started once the first text (or the final result) is in."""
    tokens = await broker.stream(request)
    texts = aiter(tokens)
    try:
        first: str | None = await unless_hung_up(http, anext(texts))
    except StopAsyncIteration:
        first = None  # the whole answer came at once (or it was empty)
    except SluiceError as err:
        raise gateway_error(err) from err  # an error result: there is nothing to cancel
    except BaseException:
        broker.drop(tokens)  # the caller left (or this handler was cancelled)
        raise
    reply = Reply.to(request, tokens.job_id)

    def close() -> None:
        if tokens.result is None:
            broker.drop(tokens)  # the answer is not whole: its reader has gone

    events = _events(reply, first, texts, tokens, request.include_usage)
    return EventStream(events, close)


class EventStream(StreamingResponse):
    """Server-Sent Events whose `on_close` runs however the response ends: the last event
    sent, the client gone (whichever way the ASGI server says so: a cancelled body task, or
    an error from `send`), or never started. Not the body generator's own `finally`: a server
    that reports a hang-up by an error from `send` leaves the generator unclosed."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closer = getattr(self._events, "aclose", None)
            if closer is not None:
                await closer()
            self._on_close()


async def _events(
    reply: Reply,
    first: str | None,
    texts: AsyncIterator[str],
    tokens: TokenStream,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body: the role, the pieces of text, the finish reason (and usage), [DONE]."""
    try:
        if reply.kind == "chat":
            yield reply.chunk("", role=True)  # OpenAI's first chunk: the role, no text
        if first:
            yield reply.chunk(first)
        async for text in texts:
            yield reply.chunk(text)
        result = tokens.result
        assert result is not None  # the iteration ends with the result, or raises
        if tokens.diverged:
            # A retry regenerated the answer differently from what was streamed (streaming.py):
            # a finish reason here would present a wrong text as whole.
            raise Internal(
                "the job was retried after its replica failed, and the retry's text differs "
                "from what was streamed; its whole answer is its stored result"
            )
        yield reply.chunk(None, finish=FINISH_REASONS.get(result.output["finish_reason"], "stop"))
        if include_usage:
            yield reply.usage_chunk(result)
    except SluiceError as err:
        # Headers are gone: the error goes in the stream, in the one error shape.
        yield event(error_body(gateway_error(err)))
    yield DONE
