"""Error codes and typed exceptions: one table maps each code to the wire and to HTTP.

The tree::

    SluiceError (code, retryable)
    ├── InvalidInput        invalid_input      400   the job's fields or input are malformed
    ├── InvalidParams       invalid_params     400   unknown or ill-typed per-job params
    ├── InputTooLarge       input_too_large    413   input or params over the configured limit
    ├── UnknownModel        unknown_model      404   no model of that name is served
    ├── Overloaded          rejected           429   admission refused the job (queue full)
    ├── ModelFailure        model_failure      500   the model raised while running the job
    ├── ResourceExhausted   resource_exhausted 503   out of memory or a timeout: retried, then
    │                                                 dead-lettered
    ├── DeadLettered        dead_lettered      500   delivered max_deliveries times, never finished
    ├── Internal            internal           500   a bug in Sluice itself
    ├── ResultTimeout       timeout            504   (client side) no result within the wait
    ├── JobExpired          expired            410   the job's deadline passed before it ran
    ├── JobCancelled        cancelled          409   the job was cancelled before it ran
    │   (the HTTP gateway's own, never in a stored result; the CLI prints them too:)
    ├── Unauthorized        unauthorized       401   no API key, or not one of the gateway's
    ├── NotFound            not_found          404   no such job (or path) at the gateway
    ├── MethodNotAllowed    method_not_allowed 405   the path does not take that HTTP method
    └── Unavailable         unavailable        503   the gateway cannot reach Redis
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    code: str
    http_status: int
    retryable: bool
    summary: str


class SluiceError(Exception):
    """Base of every Sluice error. `code` is stable and is what goes on the wire."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(SluiceError):
    """The job's fields or input are malformed."""

    code, http_status = "invalid_input", 400


class InvalidParams(SluiceError):
    """Unknown or ill-typed per-job params."""

    code, http_status = "invalid_params", 400


class InputTooLarge(SluiceError):
    """Input or params over the configured limit."""

    code, http_status = "input_too_large", 413


class UnknownModel(SluiceError):
    """No model of that name is served."""

    code, http_status = "unknown_model", 404


class Overloaded(SluiceError):
    """Admission refused the job (queue full)."""

    code, http_status, retryable = "rejected", 429, True

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        accepted: list[str] | None = None,
        rejected: list[str] | None = None,
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.accepted = accepted or []  # of a `submit_many`: the ids that were queued
        self.rejected = rejected or []


Rejected = Overloaded  # the wire code's name


class ModelFailure(SluiceError):
    """The model raised while running the job."""

    code, http_status = "model_failure", 500


class ResourceExhausted(SluiceError):
    """Out of memory or a timeout: retried, then dead-lettered."""

    code, http_status, retryable = "resource_exhausted", 503, True


class DeadLettered(SluiceError):
    """Delivered max_deliveries times and never finished."""

    code, http_status = "dead_lettered", 500


class Internal(SluiceError):
    """A bug in Sluice itself."""

    code, http_status = "internal", 500


class ResultTimeout(SluiceError):
    """No result arrived within the client's wait."""

    code, http_status, retryable = "timeout", 504, True


class JobExpired(SluiceError):
    """The job's deadline passed before it ran."""

    code, http_status = "expired", 410


class JobCancelled(SluiceError):
    """The job was cancelled before it ran."""

    code, http_status = "cancelled", 409


class Unauthorized(SluiceError):
    """HTTP gateway: no API key, or not one of the gateway's (CLI: Redis refused its user)."""

    code, http_status = "unauthorized", 401


class NotFound(SluiceError):
    """HTTP gateway: no such job (or path); `sluice cancel`: an id admission never queued."""

    code, http_status = "not_found", 404


class MethodNotAllowed(SluiceError):
    """HTTP gateway only: the path does not take that method."""

    code, http_status = "method_not_allowed", 405


class Unavailable(SluiceError):
    """HTTP gateway and CLI: Redis cannot be reached (CLI: nor what `sluice up` starts)."""

    code, http_status, retryable = "unavailable", 503, True


_ALL: tuple[type[SluiceError], ...] = (
    InvalidInput,
    InvalidParams,
    InputTooLarge,
    UnknownModel,
    Overloaded,
    ModelFailure,
    ResourceExhausted,
    DeadLettered,
    Internal,
    ResultTimeout,
    JobExpired,
    JobCancelled,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    Unavailable,
)

#: code -> exception class; the single source of truth for codes.
BY_CODE: dict[str, type[SluiceError]] = {cls.code: cls for cls in _ALL}

#: code -> (HTTP status, retryable, summary), for docs and the HTTP gateway.
TABLE: dict[str, ErrorSpec] = {
    cls.code: ErrorSpec(cls.code, cls.http_status, cls.retryable, (cls.__doc__ or "").strip())
    for cls in _ALL
}


def from_wire(code: str, message: str, *, job_id: str | None = None) -> SluiceError:
    """The typed exception for a wire error; unknown codes map to `SluiceError` itself."""
    cls = BY_CODE.get(code)
    if cls is None:
        return SluiceError(f"{code}: {message}", job_id=job_id)
    return cls(message, job_id=job_id)


def classify(exc: BaseException) -> SluiceError:
    """What a runner's exception means for the job: retryable (transient: out of memory,
    timeouts, lost connections) or final (`model_failure`: the same input fails again).

    torch's `OutOfMemoryError` is matched by name so this module needs no torch."""
    if isinstance(exc, SluiceError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError | TimeoutError | ConnectionError) or (
        type(exc).__name__ == "OutOfMemoryError"
    ):
        return ResourceExhausted(text)
    return ModelFailure(text)
