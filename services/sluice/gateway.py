"""The HTTP gateway: a FastAPI app, served as a Ray Serve ingress deployment (docs/gateway.md).

HTTP callers get the jobs API (`/v1/jobs`: submit, look up, cancel) and OpenAI's embeddings API
(`/v1/embeddings`: synchronous, but queued like any job and answered from the gateway's reply
stream). All of it goes through the SDK as the least-privilege `sluice-producer`
(docs/security.md), with one `AsyncClient` per gateway process, so every waiting request shares
one blocked XREAD. Admission (queue bound, dedupe, model check) stays in Redis, where every
other producer meets it too.

`create_app(settings)` builds the app; `Gateway` is the thin Serve shell around it, and
`build_app(args)` the builder that a Serve config names (`sluice.gateway:build_app`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Annotated, Any

import orjson
from fastapi import Body, Depends, FastAPI, Path, Request
from pydantic import SecretStr
from ray import serve
from ray.serve import Application
from starlette.responses import Response

from sluice import __version__, admission
from sluice.client import AsyncClient
from sluice.errors import InvalidInput, NotFound, Overloaded, ResultTimeout, UnknownModel
from sluice.gateway_http import (
    ERRORS,
    OVERLOADED,
    TIMEOUT,
    UNAUTHORIZED,
    UNKNOWN,
    BodyLimit,
    document_limits,
    documented,
    install_error_handlers,
    key_check,
)
from sluice.gateway_models import (
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    JobAdmitted,
    JobSpec,
    JobState,
    Ready,
    SubmitMany,
    SubmitRequest,
    SubmitResponse,
    embeddings_response,
    state_response,
)
from sluice.logs import route_logs
from sluice.protocol import (
    JOB_ID_RE,
    MODELS_KEY,
    Result,
    encode_job_fields,
    info_key,
    job_key,
    result_key,
)
from sluice.settings import MODEL_NAME_RE, GatewayOptions, GatewaySettings

log = logging.getLogger(__name__)


class Broker:
    """What the routes do: each method is one request's work against Redis, through the SDK."""

    def __init__(self, client: AsyncClient, options: GatewayOptions) -> None:
        self.client = client
        self.options = options

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
        caller_id, job_id = job_id, scoped(tenant, job_id)
        async with self.client.redis.pipeline(transaction=False) as pipe:
            pipe.get(result_key(model, job_id))
            pipe.exists(job_key(model, job_id))
            pipe.exists(info_key(model))
            raw, queued, registered = await pipe.execute()
        if raw is not None:
            return replace(Result.from_json(raw), id=caller_id)
        if not registered:
            raise UnknownModel(f"no model {model!r} is registered in this Redis")
        if not queued:
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

    async def check_task(self, model: str, task: str) -> None:
        raw: bytes | str | None = await self.client.redis.hget(info_key(model), "task")
        if raw is None:
            raise UnknownModel(f"no model {model!r} is registered in this Redis")
        registered = raw.decode() if isinstance(raw, bytes) else raw
        if registered != task:
            raise InvalidInput(f"model {model!r} is a {registered} model, not {task}")

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


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(_broker)]
ModelPath = Annotated[str, Path(pattern=MODEL_NAME_RE.pattern)]
IdPath = Annotated[str, Path(pattern=JOB_ID_RE.pattern)]


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's FastAPI app; its lifespan opens (and closes) the one SDK client."""
    options = settings.gateway

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = AsyncClient(settings.redis_url, cluster=settings.redis_cluster)
        app.state.broker = Broker(client, options)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(
        title="Sluice gateway",
        version=__version__,
        summary="Queue-fed inference over HTTP: the jobs API and OpenAI-style embeddings.",
        lifespan=lifespan,
        responses=documented(ERRORS),
    )
    install_error_handlers(app, options)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    document_limits(app, options)
    if settings.api_keys:
        log.info("gateway: %d API key(s) accepted", len(settings.api_keys))
    else:
        log.warning(
            "gateway: SLUICE_API_KEYS is empty, so AUTHENTICATION IS OFF: anyone who can reach "
            "this port can submit, read and cancel jobs"
        )
    _add_routes(app, settings.api_keys)

    @app.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Ready, summary="Redis answers")
    async def readyz(broker: BrokerDep) -> Ready:
        return Ready(**await broker.readiness())

    return app


def _add_routes(app: FastAPI, keys: Sequence[SecretStr]) -> None:
    """The /v1 routes, behind the API keys when there are any. On the app itself, not on an
    APIRouter: FastAPI wraps an included router in a route of its own, which would hide the
    routes from the 405 handler's `Allow`."""
    # The caller's tenant: its API key's namespace, "" when auth is off. A default value, not
    # an Annotated alias: this module's annotations are strings, and a local alias would not
    # resolve when FastAPI reads them.
    tenant_dep: Any = Depends(key_check(keys))

    def errors(*groups: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
        return documented(*groups, *([UNAUTHORIZED] if keys else []))

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=SubmitResponse,
        responses=errors(UNKNOWN, OVERLOADED),
        summary="Queue one job, or many",
    )
    async def submit_jobs(
        body: Annotated[SubmitRequest, Body()], broker: BrokerDep, tenant: str = tenant_dep
    ) -> SubmitResponse:
        if isinstance(body, SubmitMany):
            jobs, priority = body.jobs, body.priority
        else:
            jobs, priority = [body], "normal"  # a one-job body is a JobSpec itself
        admitted = await broker.submit(body.model, jobs, priority, tenant)
        return SubmitResponse(
            model=body.model, jobs=[JobAdmitted(id=a.job_id, status=a.status) for a in admitted]
        )

    @app.get(
        "/v1/jobs/{model}/{id}",
        response_model=JobState,
        responses=errors(UNKNOWN),
        summary="A job's status, and its result once it has one",
    )
    async def get_job(
        model: ModelPath, id: IdPath, broker: BrokerDep, tenant: str = tenant_dep
    ) -> Response:
        return state_response(model, id, await broker.state(model, id, tenant))

    @app.delete(
        "/v1/jobs/{model}/{id}",
        response_model=JobState,
        responses=errors(UNKNOWN),
        summary="Cancel a job; answers its final result",
    )
    async def cancel_job(
        model: ModelPath, id: IdPath, broker: BrokerDep, tenant: str = tenant_dep
    ) -> Response:
        return state_response(model, id, await broker.cancel(model, id, tenant))

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=errors(UNKNOWN, OVERLOADED, TIMEOUT),
        summary="OpenAI-compatible embeddings, through the queue",
    )
    async def embeddings(
        body: EmbeddingRequest, broker: BrokerDep, tenant: str = tenant_dep
    ) -> Response:
        del tenant  # checked; the jobs' ids are random and never shown, so need no namespace
        return embeddings_response(body, await broker.embed(body))


@serve.deployment(
    name="Gateway",
    ray_actor_options={"num_cpus": 0.5},
    # Requests mostly wait on Redis and the replicas, not on this process's CPU.
    max_ongoing_requests=256,
    graceful_shutdown_timeout_s=35,  # an embeddings request may wait embeddings_timeout_s
)
@serve.ingress()  # the app is built on the replica, by __serve_build_asgi_app__
class Gateway:
    """The Serve shell around `create_app`: one gateway process per replica."""

    def __init__(self, args: dict[str, Any]) -> None:
        # Read on the replica, so SLUICE_API_KEYS comes from the replica's own environment and
        # never travels in (or shows up with) the Serve config.
        self.settings = GatewaySettings(**args)
        route_logs(self.settings.log_level)
        self.api = create_app(self.settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.api

    async def readiness(self) -> dict[str, Any]:
        """What GET /readyz answers, for a `DeploymentHandle` caller."""
        broker: Broker = self.api.state.broker
        return await broker.readiness()


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder (`import_path: sluice.gateway:build_app`).

    `args`: `redis_url`, `redis_cluster`, `log_level` and `gateway` (GatewayOptions: the
    model allowlist and the limits); unset ones come from the `SLUICE_*` environment of the
    replica. Validated here too, so a bad config fails the deploy, loudly.
    """
    if "api_keys" in args:
        raise ValueError(
            "api_keys do not belong in the Serve config (Ray stores and shows it): set "
            "SLUICE_API_KEYS in the gateway's environment"
        )
    GatewaySettings(**args)
    app: Application = Gateway.bind(dict(args))  # type: ignore[attr-defined]
    return app
