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

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Path, Request
from pydantic import SecretStr
from ray import serve
from ray.serve import Application
from starlette.responses import Response

from sluice import __version__
from sluice.client import AsyncClient
from sluice.gateway import chat
from sluice.gateway.bodies import (
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    JobAdmitted,
    JobState,
    Ready,
    SubmitMany,
    SubmitRequest,
    SubmitResponse,
    embeddings_response,
    state_response,
)
from sluice.gateway.broker import Broker
from sluice.gateway.chat_bodies import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from sluice.gateway.http import (
    ERRORS,
    OVERLOADED,
    STREAMED,
    TIMEOUT,
    UNAUTHORIZED,
    UNKNOWN,
    BodyLimit,
    document_limits,
    documented,
    install_error_handlers,
    key_check,
    unless_hung_up,
)
from sluice.logs import route_logs
from sluice.protocol import JOB_ID_RE
from sluice.settings import MODEL_NAME_RE, GatewaySettings

log = logging.getLogger(__name__)


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
        app.state.broker = broker = Broker(client, options)
        try:
            yield
        finally:
            await broker.close()

    app = FastAPI(
        title="Sluice gateway",
        version=__version__,
        summary="Queue-fed inference over HTTP: the jobs API, and OpenAI-style embeddings, chat "
        "and completions.",
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
        body: EmbeddingRequest, request: Request, broker: BrokerDep, tenant: str = tenant_dep
    ) -> Response:
        del tenant  # checked; the jobs' ids are random and never shown, so need no namespace
        return embeddings_response(body, await unless_hung_up(request, broker.embed(body)))

    @app.post(
        "/v1/chat/completions",
        responses=errors(UNKNOWN, OVERLOADED, TIMEOUT) | STREAMED,
        summary="OpenAI-compatible chat, through the queue; streamed with `stream: true`",
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, broker: BrokerDep, tenant: str = tenant_dep
    ) -> Response:
        del tenant  # as for embeddings: the job's id is random
        return await (chat.stream if body.stream else chat.complete)(broker, body, request)

    @app.post(
        "/v1/completions",
        responses=errors(UNKNOWN, OVERLOADED, TIMEOUT) | STREAMED,
        summary="OpenAI-compatible text completion (no chat template), through the queue",
    )
    async def completions(
        body: CompletionRequest, request: Request, broker: BrokerDep, tenant: str = tenant_dep
    ) -> Response:
        del tenant
        return await (chat.stream if body.stream else chat.complete)(broker, body, request)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=errors(),
        summary="The registered models this gateway serves",
    )
    async def models(broker: BrokerDep, tenant: str = tenant_dep) -> ModelList:
        del tenant
        return ModelList(data=[ModelCard(**card) for card in await broker.models()])


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


def from_env() -> FastAPI:
    """The app from the `SLUICE_*` environment alone, for an ASGI server without Serve
    (a benchmark, a sidecar): `uvicorn --factory sluice.gateway:from_env --port 8000`."""
    settings = GatewaySettings()
    route_logs(settings.log_level)
    return create_app(settings)


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
