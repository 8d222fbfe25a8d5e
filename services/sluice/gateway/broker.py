"""What the gateway's routes do, one request's work against Redis each, through the SDK as the
least-privilege `sluice-producer`; and the API keys' job id namespaces (`<tenant>:<id>`)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

import orjson

from sluice import admission
from sluice.client import AsyncClient
from sluice.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    ResultTimeout,
    SluiceError,
    UnknownModel,
)
from sluice.gateway.bodies import EmbeddingRequest, JobSpec
from sluice.gateway.chat_bodies import GenerationRequest
from sluice.protocol import (
    JOB_ID_RE,
    MODELS_KEY,
    Result,
    encode_job_fields,
    info_key,
)
from sluice.settings import GatewayOptions
from sluice.streaming import TokenStream


class Broker:
    """What the routes do: each method is one request's work against Redis, through the SDK."""

    def __init__(self, client: AsyncClient, options: GatewayOptions) -> None:
        self.client = client
        self.options = options
        self._tasks: set[asyncio.Task[Any]] = set()  # cancels of jobs whose callers left

    async def close(self) -> None:
        """Lets the cancels under way finish (briefly), then closes the client."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.client.close()

    def allow(self, model: str) -> None:
        if self.options.models is not None and model not in self.options.models:
            raise UnknownModel(f"model {model!r} is not served by this gateway")

    def check_count(self, count: int, what: str) -> None:
        limit = self.options.max_jobs_per_request
        if count > limit:
            raise InvalidInput(f"{count} {what} in one request, over the limit of {limit}")

    async def submit(
        self, model: str, jobs: Sequence[JobSpec], priority: str, tenant: str = ""
    ) -> list[admission.Admitted]:
        """Queues the jobs through admission, their ids in `tenant`'s namespace; `Overloaded`
        if the queue refused any. The ids answered are the caller's own."""
        self.allow(model)
        self.check_count(len(jobs), "jobs")
        lanes: dict[str, list[tuple[int, str, dict[str, str]]]] = {}
        for index, job in enumerate(jobs):
            job_id = scoped(tenant, job.id or uuid.uuid4().hex)
            try:
                fields = encode_job_fields(
                    job_id, job.input, params=job.params, deadline_ms=job.deadline_ms
                )
            except orjson.JSONEncodeError as exc:  # Python's JSON took it; the wire's cannot
                raise InvalidInput(f"`jobs[{index}]` cannot go on the wire: {exc}") from exc
            lanes.setdefault(job.priority or priority, []).append((index, job_id, fields))
        answers: dict[int, admission.Admitted] = {}
        # Admission itself, not `AsyncClient.submit_many`: these jobs carry their own params,
        # deadlines and lanes, and no reply_to (HTTP callers GET their results; pushing them
        # to this process would only fill its memory).
        for lane, entries in lanes.items():
            pairs = [(job_id, fields) for _, job_id, fields in entries]
            admitted = await admission.submit(self.client.redis, model, pairs, lane)
            answers.update(zip((index for index, _, _ in entries), admitted, strict=True))
        # The caller's own ids, in the answer and in an `Overloaded`'s accepted/rejected.
        ordered = [
            replace(answers[i], job_id=unscoped(tenant, answers[i].job_id))
            for i in range(len(jobs))
        ]
        admission.raise_if_rejected(model, ordered)
        return ordered

    async def state(self, model: str, job_id: str, tenant: str = "") -> Result | None:
        """The job's final result (under the caller's own id), or None while it is pending;
        `NotFound` if `tenant` submitted no such job."""
        self.allow(model)
        caller_id = job_id
        known = await admission.lookup(self.client.redis, model, scoped(tenant, job_id))
        if known.result is not None:
            return replace(known.result, id=caller_id)
        if not known.registered:
            raise UnknownModel(f"no model {model!r} is registered in this Redis")
        if not known.queued:
            raise NotFound(
                f"no job {caller_id!r} of model {model!r}: never submitted through admission "
                "with this API key, or its result has expired"
            )
        return None

    async def cancel(self, model: str, job_id: str, tenant: str = "") -> Result:
        """The SDK's cancel, for a job `tenant` submitted; returns the final result."""
        final = await self.state(model, job_id, tenant)
        if final is not None:
            return final  # a cancel is not an undo: the job keeps its result
        result = await self.client.cancel(scoped(tenant, job_id), model=model)
        return replace(result, id=job_id)

    async def embed(self, request: EmbeddingRequest) -> list[Result]:
        """Runs the texts through the queue and waits for all of their results."""
        model = request.model
        texts = [request.input] if isinstance(request.input, str) else request.input
        self.allow(model)
        self.check_count(len(texts), "inputs")
        await self.check_task(model, "embed")
        # base64 is made by the replica, from the float32 vector itself: passed through as is.
        params = {"encoding": "base64"} if request.encoding_format == "base64" else None
        timeout_s = self.options.embeddings_timeout_s
        try:
            # The deadline makes a job that is still queued when the caller gives up expire
            # unrun instead of spending the model on an answer nobody reads.
            ids = await self.client.submit_many(model, texts, params=params, deadline_s=timeout_s)
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate, which UTF-8 cannot carry
            raise InvalidInput(f"`input` cannot go on the wire: {exc}") from exc
        except Overloaded as exc:
            await self.abandon(model, exc.accepted)
            raise Overloaded(f"model {model!r}: the queue is full; retry later") from exc
        try:
            return await self.client.wait(ids, timeout_s)
        except ResultTimeout as exc:
            await self.abandon(model, ids)
            raise ResultTimeout(
                f"no embeddings within {timeout_s}s; the jobs were cancelled"
            ) from exc
        except asyncio.CancelledError:
            await self.abandon(model, ids)  # the caller hung up: nobody will read these
            raise

    # -- generation (OpenAI chat and completions: chat.py) ----------------------------------

    async def complete(self, request: GenerationRequest) -> Result:
        """Runs one generation job and waits for its final result (whatever its status)."""
        model, job_input, params = await self._generation(request)
        timeout_s = self.options.generation_timeout_s
        job_id = await self._submit_generation(model, job_input, params, timeout_s)
        try:
            (result,) = await self.client.wait([job_id], timeout_s)
        except ResultTimeout as exc:
            await self.client.cancel(job_id, model=model)
            raise ResultTimeout(f"no answer within {timeout_s}s; the job was cancelled") from exc
        except asyncio.CancelledError:
            self._spawn(self.client.cancel(job_id, model=model))  # the caller hung up
            raise
        return result

    async def stream(self, request: GenerationRequest) -> TokenStream:
        """Queues one generation job whose text deltas come back as it runs."""
        model, job_input, params = await self._generation(request)
        timeout_s = self.options.generation_timeout_s
        try:
            return await self.client.stream(
                model, job_input, params=params, timeout=timeout_s, deadline_s=timeout_s
            )
        except orjson.JSONEncodeError as exc:
            raise InvalidInput(f"the request cannot go on the wire: {exc}") from exc

    def drop(self, tokens: TokenStream) -> None:
        """Cancels a streamed job whose reader has gone, in a task of its own: the request's
        task is being cancelled itself, and would cancel the cancel."""
        self._spawn(tokens.cancel())

    async def _generation(
        self, request: GenerationRequest
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        model = request.model
        self.allow(model)
        # A 404, as OpenAI answers a model that is not a chat model on its chat endpoint.
        await self.check_task(model, "generate", refuse_as=UnknownModel)
        params = request.job_params()
        if params["temperature"] > 0 and "seed" not in params:
            # Seeded, so a retry after a replica died samples the same text again, and the
            # text already streamed stays the answer's beginning (streaming.py).
            params["seed"] = random.getrandbits(63)
        return model, request.job_input(), params

    async def _submit_generation(
        self, model: str, job_input: dict[str, Any], params: dict[str, Any], timeout_s: float
    ) -> str:
        try:
            # The deadline: a job still queued when the caller gives up expires unrun.
            return await self.client.submit(model, job_input, params=params, deadline_s=timeout_s)
        except orjson.JSONEncodeError as exc:
            raise InvalidInput(f"the request cannot go on the wire: {exc}") from exc

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # owned until done: a dropped task could be collected mid-way
        task.add_done_callback(self._tasks.discard)

    async def models(self) -> list[dict[str, Any]]:
        """The registered models this gateway serves, in OpenAI's model list shape."""
        names: Any = self.options.models
        if names is None:
            registered = await self.client.redis.smembers(MODELS_KEY)
            names = sorted(_text(name) for name in registered)
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for name in names:  # HGETs: the producer's ACL has no HMGET
                pipe.hget(info_key(name), "task")
                pipe.hget(info_key(name), "registered_ms")
            replies = await pipe.execute()
        listed = []
        pairs = zip(replies[::2], replies[1::2], strict=True)
        for name, (task, registered_ms) in zip(names, pairs, strict=True):
            if task is None:
                continue  # allowed, but not registered (yet)
            created = int(registered_ms or 0) // 1000
            card = {"id": name, "object": "model", "created": created}
            listed.append({**card, "owned_by": "sluice", "task": _text(task)})
        return listed

    async def check_task(
        self, model: str, task: str, refuse_as: type[SluiceError] = InvalidInput
    ) -> None:
        """`UnknownModel` for a model nobody registered; `refuse_as` for one of another task."""
        raw: bytes | str | None = await self.client.redis.hget(info_key(model), "task")
        if raw is None:
            raise UnknownModel(f"no model {model!r} is registered in this Redis")
        registered = raw.decode() if isinstance(raw, bytes) else raw
        if registered != task:
            raise refuse_as(f"model {model!r} is a {registered} model, not {task}")

    async def abandon(self, model: str, ids: Sequence[str]) -> None:
        """Cancels jobs whose answers nobody will read. One at a time: a request may hold a
        thousand, and a burst of concurrent cancels would open a connection each."""
        for job_id in ids:
            await self.client.cancel(job_id, model=model)

    async def readiness(self) -> dict[str, Any]:
        """Redis answers (else a Redis error: 503); which allowed models are registered."""
        models = self.options.models or []
        async with self.client.redis.pipeline(transaction=False) as pipe:
            # EXISTS, not PING: the producer's ACL allows no PING (docs/security.md).
            pipe.exists(MODELS_KEY)
            for model in models:
                pipe.exists(info_key(model))
            replies = await pipe.execute()
        return {"status": "ready", "models": dict(zip(models, map(bool, replies[1:]), strict=True))}


def scoped(tenant: str, job_id: str) -> str:
    """The id a job is stored under: `<tenant>:<id>` (tenant: the API key's namespace)."""
    if not tenant:
        return job_id
    full = f"{tenant}:{job_id}"
    if not JOB_ID_RE.fullmatch(full):
        room = 128 - len(tenant) - 1
        raise InvalidInput(f"job id {job_id[:40]!r} is too long: at most {room} characters here")
    return full


def unscoped(tenant: str, job_id: str) -> str:
    return job_id[len(tenant) + 1 :] if tenant and job_id.startswith(f"{tenant}:") else job_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
