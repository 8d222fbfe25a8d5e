"""The gateway's HTTP plumbing: one error shape for every failure, API keys, the body limit.

Routes raise `SluiceError`s. Here they, and whatever FastAPI, Starlette or redis-py raise, become
`{"error": {"code", "message", "type"}}` with the HTTP status of `errors.TABLE`: the one table,
so a code means the same status over HTTP as in the SDK and the docs. `type` is OpenAI's
error type, for OpenAI clients, which read `error.message` and branch on `error.type`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.errors import (
    TABLE,
    InputTooLarge,
    Internal,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ResultTimeout,
    SluiceError,
    Unauthorized,
    Unavailable,
)
from sluice.gateway.bodies import ErrorBody
from sluice.settings import GatewayOptions

log = logging.getLogger(__name__)

# What an HTTPException that Starlette or FastAPI raised (no route, wrong method, body over
# the limit) means in Sluice's codes; any other status is a 400 or a 500 by its class.
_BY_STATUS: dict[int, type[SluiceError]] = {
    400: InvalidInput,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    413: InputTooLarge,
    422: InvalidInput,
    429: Overloaded,
    503: Unavailable,
    504: ResultTimeout,
}
_MAX_VALIDATION_ERRORS = 5  # listed in one message; the rest are counted


def error_type(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


HANG_UP_CHECK_S = 0.25
T = TypeVar("T")


class HungUp(Exception):
    """The client disconnected before its answer: nobody reads a response any more."""


async def unless_hung_up(request: Request, work: Awaitable[T]) -> T:
    """`work`'s value, or `HungUp` as soon as the client disconnects, `work` cancelled (its
    own cleanup cancels its jobs). Uvicorn tells an app that its client left, but does not
    cancel the handler (Serve does): without this, a hung-up request would hold its jobs, and
    the model, for its whole timeout."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=HANG_UP_CHECK_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task})
                raise HungUp
        return task.result()
    finally:
        if not task.done():
            task.cancel()  # this handler was cancelled itself: so is its work


def status_of(err: SluiceError) -> int:
    """The HTTP status of the code's row in errors.TABLE."""
    spec = TABLE.get(err.code)
    return spec.http_status if spec is not None else 500


def error_body(err: SluiceError) -> dict[str, Any]:
    """The one error shape, `{"error": {"code", "message", "type"}}`, as a value (what a
    stream that has started sends instead of a status)."""
    detail = {"code": err.code, "message": err.message, "type": error_type(status_of(err))}
    return {"error": detail}


def error_response(err: SluiceError, *, retry_after_s: int = 1) -> Response:
    """The one error shape, with the status of the code's row in errors.TABLE."""
    status = status_of(err)
    detail: dict[str, Any] = error_body(err)["error"]
    headers: dict[str, str] = {}
    if isinstance(err, Overloaded):
        headers["Retry-After"] = str(retry_after_s)
        if err.accepted or err.rejected:
            detail |= {"accepted": err.accepted, "rejected": err.rejected}
    elif isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return Response(orjson.dumps({"error": detail}), status, headers, media_type="application/json")


def install_error_handlers(app: FastAPI, options: GatewayOptions) -> None:
    """Routes every failure of `app` through `error_response`."""

    def respond(err: SluiceError) -> Response:
        return error_response(err, retry_after_s=options.retry_after_s)

    async def hung_up(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    app.add_exception_handler(HungUp, hung_up)

    async def sluice_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, SluiceError)
        return respond(exc)

    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return respond(InvalidInput(validation_message(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        cls = _BY_STATUS.get(exc.status_code, InvalidInput if exc.status_code < 500 else Internal)
        response = respond(cls(str(exc.detail)))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            # Starlette's `Allow` names the methods of the first route on the path only; GET
            # and DELETE of one job are two routes.
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    async def redis_error(_: Request, exc: Exception) -> Response:
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            log.warning("redis unreachable: %s", exc)
            return respond(Unavailable("Redis cannot be reached; try again shortly"))
        # Anything else (a refused command, NOPERM) is a deployment or code bug, not the caller's.
        log.error("redis refused a command: %r", exc)
        return respond(Internal("Redis refused a command; see the gateway's log"))

    async def unexpected(request: Request, exc: Exception) -> Response:
        # One line: Starlette re-raises the exception after this answer, and the server
        # (uvicorn, or Serve's replica) logs its traceback.
        log.error("unhandled %r in %s %s", exc, request.method, request.url.path)
        return respond(Internal("internal error; see the gateway's log"))

    app.add_exception_handler(SluiceError, sluice_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RedisError, redis_error)
    app.add_exception_handler(Exception, unexpected)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on the request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                methods |= route.methods
    return sorted(methods)


def validation_message(errors: Sequence[Any]) -> str:
    """One line naming each bad field, e.g. "`model`: Field required; `input`: ..."."""
    parts = []
    for error in errors[:_MAX_VALIDATION_ERRORS]:
        # The first `loc` item says where (body, path, query); the discriminated union of
        # POST /v1/jobs adds its tag ("many" or "one"), which means nothing to the caller.
        loc = [str(p) for p in error.get("loc", ())[1:] if p not in ("many", "one")]
        where = f"`{'.'.join(loc)}`: " if loc else ""
        parts.append(f"{where}{error.get('msg', 'invalid')}")
    more = len(errors) - _MAX_VALIDATION_ERRORS
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts) or "invalid request"


_bearer = HTTPBearer(auto_error=False, description="one of the gateway's API keys")
KeyCheck = Callable[..., Awaitable[str]]


_TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def tenant_of(key: bytes) -> str:
    """The namespace of a key given without a name: `k` and 12 hex digits of its SHA-256."""
    return "k" + hashlib.sha256(key).hexdigest()[:12]


#: A named tenant may not look like a key's own (`tenant_of`): the two would share jobs.
_DERIVED = re.compile(r"^k[0-9a-f]{12}$")
MIN_KEY_CHARS = 16


def parse_key(entry: str) -> tuple[str, bytes]:
    """(tenant, secret) of one `SLUICE_API_KEYS` entry: `name:secret` names the tenant (so
    that several keys, a rotation's old and new, share one namespace); a bare secret is a
    tenant of its own (`tenant_of`). `:` is never in a hex or base64 key, so a bare key is
    never split. A secret under 16 characters is refused: `ValueError`, at start."""
    name, sep, secret = entry.partition(":")
    if sep and _TENANT_NAME.fullmatch(name):
        if _DERIVED.fullmatch(name):
            raise ValueError(f"API key tenant name {name!r} looks like a derived one (k + 12 hex)")
        tenant, raw = name, secret
    else:
        tenant, raw = tenant_of(entry.encode()), entry
    if len(raw) < MIN_KEY_CHARS or not raw.strip("="):
        raise ValueError(
            f"an API key of tenant {tenant!r} is {len(raw)} characters: use at least "
            f"{MIN_KEY_CHARS} random ones (for example `openssl rand -hex 32`)"
        )
    return tenant, raw.encode()


def key_check(keys: Sequence[SecretStr]) -> KeyCheck:
    """A FastAPI dependency that admits a request bearing one of `keys` and answers its
    tenant (`parse_key`), or `""` when the gateway has no keys (one tenant: everyone).

    Job ids are stored as `<tenant>:<id>`, so a key sees, cancels and is told about only the
    jobs of its tenant, whatever ids its callers choose."""
    entries = [parse_key(key.get_secret_value()) for key in keys]

    if not entries:

        async def anyone() -> str:
            return ""

        return anyone

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> str:
        if credentials is None:
            raise Unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        given = credentials.credentials.encode()
        # Every key is compared, each in constant time, so how long the check takes tells
        # nothing of which key matched, or of how much of one did.
        tenant = ""
        for name, secret in entries:
            if hmac.compare_digest(given, secret):
                tenant = name
        if not tenant:
            raise Unauthorized("invalid API key")
        return tenant

    return require_key


class BodyLimit:
    """Refuses a body over `max_bytes`: at once when its `Content-Length` says so, else (a
    chunked body) as soon as the bytes read pass the limit; both in the one error shape.

    Not FastAPI's own `max_body_size`: that rewrites any response to a request that declares
    too long a body into a plain-text 413, outside the error shape."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(InputTooLarge(self._message()))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI re-raises an HTTPException from the body read as it is, so this
                # reaches the 413 handler of install_error_handlers.
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is over the limit of {self.max_bytes} bytes"


# The OpenAPI description of the error responses. "default" covers every other status (a 405,
# a 500) and keeps FastAPI from documenting its own 422, which the gateway never answers.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid_input or invalid_params"},
    413: {"description": "input_too_large: the body is over max_body_bytes"},
    503: {"description": "unavailable: Redis cannot be reached"},
    "default": {"description": "any other error, in the same shape"},
}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "unauthorized: no API key, or a wrong one",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    }
}
UNKNOWN: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown_model, or not_found (no such job)"}
}
OVERLOADED: dict[int | str, dict[str, Any]] = {
    429: {
        "description": "rejected: the model's queue is full; retry after Retry-After seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    }
}
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the answer: JSON, or with `stream: true` Server-Sent Events of chunks "
        "ending `data: [DONE]`",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}
TIMEOUT: dict[int | str, dict[str, Any]] = {
    504: {"description": "timeout: no result within embeddings_timeout_s"}
}


def documented(*groups: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error groups, each in the one error shape."""
    return {
        status: {**spec, "model": ErrorBody} for group in groups for status, spec in group.items()
    }


def document_limits(app: FastAPI, options: GatewayOptions) -> None:
    """Writes the configured `max_jobs_per_request` into the app's OpenAPI document, as the
    `maxItems` of the job and input lists: a setting, so the static models cannot carry it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            lists = [
                schemas["SubmitMany"]["properties"]["jobs"],
                *(
                    s
                    for s in schemas["EmbeddingRequest"]["properties"]["input"]["anyOf"]
                    if s.get("type") == "array"
                ),
            ]
            for schema in lists:
                schema["maxItems"] = options.max_jobs_per_request
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
