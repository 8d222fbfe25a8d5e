"""The HTTP gateway's bodies (docs/gateway.md): the jobs API, OpenAI-style embeddings, and
the one error shape; and the response bodies built from results. gateway.py says what the
routes do.

The schemas here are the gateway's OpenAPI document, so each constraint a route enforces is
written into the schema (patterns, enums, bounds) rather than checked later by hand: a client
generated from `/openapi.json`, and the schemathesis test, see the same rules the code applies.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from starlette.responses import Response

from sluice.errors import InvalidParams, ResultTimeout, from_wire
from sluice.protocol import JOB_ID_RE, Result
from sluice.settings import MODEL_NAME_RE

ModelName = Annotated[
    str,
    Field(pattern=MODEL_NAME_RE.pattern, description="a model name, as in sluice:{M}:jobs"),
]
JobId = Annotated[str, Field(pattern=JOB_ID_RE.pattern, description="a job id")]
Priority = Literal["high", "normal", "low"]
Admission = Literal["queued", "duplicate", "done"]
FinalStatus = Literal["ok", "error", "expired", "cancelled"]  # protocol.STATUSES
JobStatus = Literal["pending", "ok", "error", "expired", "cancelled"]
# `deadline_ms` is absolute Unix time in ms; the wire takes at most 16 digits (protocol.py).
Text = Annotated[str, Field(min_length=1)]
DeadlineMs = Annotated[int, Field(gt=0, lt=10**16, description="absolute Unix time, ms")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- jobs -------------------------------------------------------------------------------------


class JobSpec(_Strict):
    """One job of a `POST /v1/jobs`: the wire fields (docs/protocol.md) as JSON values."""

    id: JobId | None = Field(
        None,
        description="your job id; a retry with the same id is not queued twice "
        "(default: a fresh random id, which a retry cannot reuse)",
    )
    input: dict[str, Any] = Field(description='the job\'s input, e.g. {"text": "hello"}')
    params: dict[str, Any] | None = Field(
        None, description='per-job options, e.g. {"encoding": "base64"}'
    )
    priority: Priority | None = Field(None, description="its lane (default: the request's)")
    deadline_ms: DeadlineMs | None = None


class SubmitMany(_Strict):
    """Many jobs for one model, in one request."""

    model: ModelName
    jobs: list[JobSpec] = Field(min_length=1, description="at most max_jobs_per_request")
    priority: Priority = Field("normal", description="the lane of jobs that name none")


class SubmitOne(JobSpec):
    """One job: a `JobSpec` with its model beside it."""

    model: ModelName


def _submit_shape(body: Any) -> str:
    has_jobs = "jobs" in body if isinstance(body, dict) else isinstance(body, SubmitMany)
    return "many" if has_jobs else "one"


# A body with `jobs` is the many-jobs shape, any other the one-job shape: each forbids the
# other's fields, so the errors of a bad body speak of the shape the caller meant.
SubmitRequest = Annotated[
    Annotated[SubmitMany, Tag("many")] | Annotated[SubmitOne, Tag("one")],
    Discriminator(_submit_shape),
]


class JobAdmitted(BaseModel):
    """What admission did with one job."""

    id: str
    status: Admission = Field(
        description="queued; duplicate (that id is queued already); done (that id has its "
        "result already)"
    )


class SubmitResponse(BaseModel):
    model: str
    jobs: list[JobAdmitted] = Field(description="one per job, in the request's order")


class WireError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    """A job's one final result, exactly as stored at `sluice:{M}:result:<id>`."""

    id: str
    model: str
    status: FinalStatus
    output: Any = Field(None, description="present when status is ok")
    error: WireError | None = Field(None, description="present when status is not ok")
    timings: dict[str, float]


class JobState(BaseModel):
    """A job as the gateway sees it: pending (queued or running), or final with its result."""

    id: str
    model: str
    status: JobStatus
    result: JobResult | None = Field(description="the final result; null while pending")


# -- embeddings (OpenAI's shape) --------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    """OpenAI's `POST /v1/embeddings` body. Unknown fields are ignored, as OpenAI clients
    send fields of their own."""

    model: ModelName
    input: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="a text, or a list of texts (not token arrays)"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32, as OpenAI encodes it"
    )
    dimensions: int | None = Field(
        None, ge=1, description="only the model's own dimension is accepted"
    )
    user: str | None = Field(None, description="accepted and ignored")

    @field_validator("input", mode="before")
    @classmethod
    def _refuse_tokens(cls, value: Any) -> Any:
        # OpenAI also takes token ids; Sluice's models tokenize text themselves, and another
        # tokenizer's ids would embed garbage. Say so, instead of a type error.
        if isinstance(value, list) and any(isinstance(v, int | list) for v in value):
            raise ValueError(
                "token arrays are not supported: send the text itself (a string, or a list "
                "of strings)"
            )
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of float32 LE")


class Usage(BaseModel):
    prompt_tokens: int = Field(
        description="tokens the model read, by its own tokenizer (after truncation, special "
        "tokens included); 0 from replicas older than this field"
    )
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# -- health and errors ------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: dict[str, bool] = Field(
        description="each allowed model (none when any is allowed): is it registered?"
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable code of docs/protocol.md's table")
    message: str = Field(description="for humans; may change")
    type: str = Field(description="OpenAI's error type: invalid_request_error, ...")
    accepted: list[str] | None = Field(
        None, description="in a 429 of POST /v1/jobs: the ids that were queued anyway"
    )
    rejected: list[str] | None = Field(
        None, description="in a 429 of POST /v1/jobs: the ids that were not"
    )


class ErrorBody(BaseModel):
    """Every error the gateway answers, whatever raised it."""

    error: ErrorDetail


# -- bodies built from results ------------------------------------------------------------


def embeddings_response(request: EmbeddingRequest, results: Sequence[Result]) -> Response:
    """OpenAI's response for the results, in input order; the first failed one raises.

    Serialized here, not by FastAPI: validating a thousand vectors through the response
    model would cost more than the rest of the request."""
    data = []
    for index, res in enumerate(results):
        if res.status == "expired":  # its deadline was the request's timeout
            raise ResultTimeout(f"input[{index}] was not run within the request's timeout")
        if res.status != "ok":
            error = res.error or {}
            code, message = error.get("code", "internal"), error.get("message", "")
            raise from_wire(code, f"input[{index}]: {message}", job_id=res.id)
        data.append({"object": "embedding", "index": index, "embedding": res.output})
    if request.dimensions is not None and data:
        dim = dimension(data[0]["embedding"])
        if request.dimensions != dim:
            raise InvalidParams(
                f"model {request.model!r} makes {dim}-dimensional embeddings; `dimensions` "
                f"{request.dimensions} is not supported"
            )
    # Counted by the replica's own tokenizer (after truncation, special tokens included).
    tokens = sum(int(res.timings.get("input_tokens", 0)) for res in results)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": data, "model": request.model, "usage": usage}
    return Response(orjson.dumps(body), media_type="application/json")


def dimension(embedding: Any) -> int:
    if isinstance(embedding, str):
        return len(base64.b64decode(embedding)) // 4  # float32
    return len(embedding)


def state_response(model: str, job_id: str, result: Result | None) -> Response:
    body = {
        "id": job_id,
        "model": model,
        "status": "pending" if result is None else result.status,
        # The stored JSON as it is, not parsed into models and dumped again.
        "result": None if result is None else orjson.Fragment(result.to_json()),
    }
    return Response(orjson.dumps(body), media_type="application/json")
