"""The HTTP gateway (sluice.gateway) against the real stack: the session's redis-server (the
gateway connects as `sluice-producer`), tiny_bert replicas on the session's Ray Serve, and
real HTTP clients (requests, the official `openai` client, schemathesis).

How the gateway is served here: the session's Serve runs with no HTTP proxy
(`proxy_location: Disabled`, tests/conftest.py), and that must not change mid-session, so
Serve itself cannot take HTTP requests. Each test gateway is therefore `create_app(settings)`,
the very app that the `Gateway` deployment serves (its `__serve_build_asgi_app__` returns it),
run by uvicorn, Serve's own ASGI server, on a free port in a thread of the test process. The
Serve shell around it (settings read on the replica, the app built there, its lifespan opening
the SDK client) is exercised by one test that deploys `build_app(args)` on Serve and calls the
deployment through a `DeploymentHandle`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import orjson
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from transformers import AutoTokenizer

from sluice import Client
from sluice.gateway import build_app, create_app
from sluice.protocol import decode_embedding, jobs_key, result_key
from sluice.settings import MODEL_NAME_RE, GatewaySettings, ReplicaConfig
from sluice.stack import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

KEY, OTHER_KEY = "test-key-" + uuid.uuid4().hex, "other-key-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_JOBS = 8
MAX_BODY = 64 * 1024
TEXTS = ["the quick brown fox", "a stream of tokens flows through the sluice", "naïve café 🙂"]


class Gateway:
    """`create_app(settings)` under uvicorn, on a free port, in a thread."""

    def __init__(self, settings: GatewaySettings) -> None:
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="gateway")

    def __enter__(self) -> Gateway:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="the gateway to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        return requests.post(self.url + path, json=body, headers=AUTH | (headers or {}))

    def get(self, path: str) -> Any:
        return requests.get(self.url + path, headers=AUTH)

    def delete(self, path: str) -> Any:
        return requests.delete(self.url + path, headers=AUTH)

    def wait_final(self, model: str, job_id: str) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            state: dict[str, Any] = self.get(f"/v1/jobs/{model}/{job_id}").json()
            return None if state["status"] == "pending" else state

        return wait_for(final, 60, what=f"job {job_id}")


def gateway_settings(producer_url: str, **options: Any) -> GatewaySettings:
    limits = {"max_jobs_per_request": MAX_JOBS, "max_body_bytes": MAX_BODY, **options}
    return GatewaySettings(redis_url=producer_url, api_keys=[KEY, OTHER_KEY], gateway=limits)


@pytest.fixture(scope="module")
def gateway(producer_url: str) -> Iterator[Gateway]:
    with Gateway(gateway_settings(producer_url)) as gw:
        yield gw


@pytest.fixture(scope="module")
def served(ray_serve: None, worker_url: str, tiny_bert: str) -> Iterator[str]:
    """One tiny_bert embedder (32 dimensions) for the module, deployed as `deploy` does."""
    from ray import serve

    from sluice.replica import Replica

    name = f"gw-{uuid.uuid4().hex[:8]}"
    args = {
        "model": {"name": name, "model_path": tiny_bert, "torch_threads": 1, "dtype": "fp32"},
        "redis_url": worker_url,
    }
    config = ReplicaConfig.from_args(args).model_dump(mode="json")
    app = Replica.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}).bind(config)
    serve.run(app, name=name, route_prefix=None)
    yield name
    serve.delete(name, _blocking=True)


@pytest.fixture
def parked(deploy: Any, model_name: str, tiny_bert: str) -> str:
    """A registered model whose replica is gone: its jobs stay queued, unpulled, so a test can
    cancel a queued job, fill the queue (max_queue_depth 3), or time out waiting."""
    from ray import serve

    deploy(model_name, tiny_bert, queue={"max_queue_depth": 3})
    serve.delete(model_name, _blocking=True)  # the registration stays in Redis
    return model_name


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """The one error shape, with the status of the code's row in errors.TABLE."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and error["type"]
    return error


def test_jobs_are_queued_run_and_looked_up(gateway: Gateway, served: str) -> None:
    first = f"job-{uuid.uuid4().hex}"
    jobs = [
        {"id": first, "input": {"text": "hello world"}},
        {"input": {"text": "compact"}, "params": {"encoding": "base64"}, "priority": "high"},
        {"input": {"text": 42}},  # the replica's validation answers it
    ]
    response = gateway.post("/v1/jobs", {"model": served, "jobs": jobs})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["model"] == served
    assert [j["status"] for j in body["jobs"]] == ["queued"] * 3
    ids = [j["id"] for j in body["jobs"]]
    assert ids[0] == first and len(set(ids)) == 3

    # The one-job shape; the same id again is not queued twice.
    again = gateway.post("/v1/jobs", {"model": served, "id": first, "input": {"text": "x"}})
    assert again.status_code == 202 and again.json()["jobs"][0]["status"] in ("duplicate", "done")

    plain, packed, bad = (gateway.wait_final(served, job_id) for job_id in ids)
    assert plain["status"] == "ok" and plain["id"] == first
    assert len(plain["result"]["output"]) == 32 and plain["result"]["timings"]["total_ms"] > 0
    assert decode_embedding(packed["result"]["output"]).shape == (32,)
    assert bad["status"] == "error" and bad["result"]["error"]["code"] == "invalid_input"

    error_of(gateway.get(f"/v1/jobs/{served}/never-submitted"), 404, "not_found")
    error_of(gateway.get("/v1/jobs/no-such-model/x"), 404, "unknown_model")
    unknown = gateway.post("/v1/jobs", {"model": "no-such-model", "input": {"text": "x"}})
    error_of(unknown, 404, "unknown_model")


def test_a_key_sees_cancels_and_is_told_about_only_its_own_jobs(
    gateway: Gateway, parked: str, r: Any
) -> None:
    """Finding 8 of issue 16: any key could GET or DELETE any job id, and callers choose ids.
    Now each key is a tenant: its ids live in its own namespace."""
    from sluice.gateway.http import tenant_of

    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    mine = gateway.post("/v1/jobs", {"model": parked, "id": "shared-id", "input": {"text": "a"}})
    assert mine.json()["jobs"] == [{"id": "shared-id", "status": "queued"}]
    url = f"{gateway.url}/v1/jobs/{parked}/shared-id"
    error_of(requests.get(url, headers=other), 404, "not_found")
    error_of(requests.delete(url, headers=other), 404, "not_found")
    assert gateway.get(f"/v1/jobs/{parked}/shared-id").json()["status"] == "pending"
    # The same id from the other key is another job, not a duplicate of the first.
    theirs = requests.post(
        f"{gateway.url}/v1/jobs",
        json={"model": parked, "id": "shared-id", "input": {"text": "b"}},
        headers=other,
    )
    assert theirs.json()["jobs"] == [{"id": "shared-id", "status": "queued"}]
    cancelled = requests.delete(url, headers=other).json()
    assert cancelled["status"] == "cancelled" and cancelled["id"] == "shared-id"
    assert cancelled["result"]["id"] == "shared-id"  # the caller's id, not the stored one
    assert gateway.get(f"/v1/jobs/{parked}/shared-id").json()["status"] == "pending"
    stored = {
        tenant: r.get(result_key(parked, f"{tenant}:shared-id"))
        for tenant in (tenant_of(KEY.encode()), tenant_of(OTHER_KEY.encode()))
    }
    assert list(stored.values()) == [None, stored[tenant_of(OTHER_KEY.encode())]]
    assert stored[tenant_of(OTHER_KEY.encode())] is not None
    assert not r.exists(result_key(parked, "shared-id"))


def test_cancel_and_a_full_queue(gateway: Gateway, parked: str, r: Any) -> None:
    queued = gateway.post("/v1/jobs", {"model": parked, "jobs": [{"input": {"text": "a"}}] * 2})
    assert queued.status_code == 202, queued.text
    kept, dropped = (j["id"] for j in queued.json()["jobs"])
    assert gateway.get(f"/v1/jobs/{parked}/{dropped}").json()["status"] == "pending"

    cancelled = gateway.delete(f"/v1/jobs/{parked}/{dropped}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["result"]["error"]["code"] == "cancelled"
    assert gateway.get(f"/v1/jobs/{parked}/{dropped}").json()["status"] == "cancelled"
    assert gateway.delete(f"/v1/jobs/{parked}/{dropped}").json()["status"] == "cancelled"
    assert gateway.get(f"/v1/jobs/{parked}/{kept}").json()["status"] == "pending"
    # An id never submitted is not cancelled ahead of time over HTTP: nothing is written.
    error_of(gateway.delete(f"/v1/jobs/{parked}/ghost"), 404, "not_found")
    assert not r.exists(result_key(parked, "ghost"))

    # Both entries still count (nothing acked them): one more fits under max_queue_depth 3.
    more = [{"id": "third", "input": {"text": "c"}}, {"id": "fourth", "input": {"text": "d"}}]
    full = gateway.post("/v1/jobs", {"model": parked, "jobs": more})
    error = error_of(full, 429, "rejected")
    assert full.headers["Retry-After"] == "1"
    assert error["type"] == "rate_limit_error"
    assert (error["accepted"], error["rejected"]) == (["third"], ["fourth"])


def test_embeddings_time_out_and_cancel_their_jobs(producer_url: str, parked: str, r: Any) -> None:
    with Gateway(gateway_settings(producer_url, embeddings_timeout_s=1.0)) as gw:
        started = time.monotonic()
        response = gw.post("/v1/embeddings", {"model": parked, "input": "never runs"})
        assert time.monotonic() - started < 10
        assert "cancelled" in error_of(response, 504, "timeout")["message"]
    # Nobody waits for that job any more: it is cancelled, and would expire unrun anyway.
    ((_, fields),) = r.xrange(jobs_key(parked))
    assert int(fields[b"deadline_ms"]) < time.time() * 1000 + 1000
    stored = orjson.loads(r.get(result_key(parked, fields[b"id"].decode())))
    assert stored["status"] == "cancelled"


def test_openai_client_gets_the_sdks_vectors(
    gateway: Gateway, served: str, producer_url: str, tiny_bert: str
) -> None:
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    floats = oai.embeddings.create(model=served, input=TEXTS, encoding_format="float")
    decoded = oai.embeddings.create(model=served, input=TEXTS)  # asks for base64 and decodes
    packed = oai.embeddings.create(model=served, input=TEXTS, encoding_format="base64")
    with Client(producer_url) as sdk:
        want = [decode_embedding(res.output) for res in sdk.wait(sdk.submit_many(served, TEXTS))]

    assert floats.object == "list" and floats.model == served
    # usage: the model's own tokenizer's count, special tokens included.
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokens = sum(len(tokenizer(text)["input_ids"]) for text in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    for response in (floats, decoded, packed):
        assert [d.index for d in response.data] == [0, 1, 2]
        assert all(d.object == "embedding" for d in response.data)
    for i, vector in enumerate(want):
        assert isinstance(packed.data[i].embedding, str)  # the wire's base64, passed through
        # Not bit-equal: the SDK's jobs ran in other batches, and a batch's shape moves the
        # last bits of a CPU matmul.
        for got in (floats.data[i].embedding, decoded.data[i].embedding):
            np.testing.assert_allclose(np.asarray(got, dtype=np.float32), vector, atol=1e-6)
        np.testing.assert_allclose(decode_embedding(packed.data[i].embedding), vector, atol=1e-6)

    one = oai.embeddings.create(model=served, input="just one", dimensions=32)
    assert len(one.data) == 1 and len(one.data[0].embedding) == 32


def test_openai_client_sees_errors_in_openais_shape(gateway: Gateway, served: str) -> None:
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as tokens:
        oai.embeddings.create(model=served, input=[[101, 7592, 102]])
    assert tokens.value.code == "invalid_input" and "token arrays" in tokens.value.message
    with pytest.raises(openai.BadRequestError) as dims:
        oai.embeddings.create(model=served, input="x", dimensions=7)
    assert dims.value.code == "invalid_params" and "32-dimensional" in dims.value.message
    with pytest.raises(openai.BadRequestError) as many:
        oai.embeddings.create(model=served, input=["x"] * (MAX_JOBS + 1))
    assert f"limit of {MAX_JOBS}" in many.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.embeddings.create(model="no-such-model", input="x")
    assert unknown.value.code == "unknown_model"
    wrong = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=served, input="x")


def test_api_keys(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    path = f"{gateway.url}/v1/jobs/no-such-model/x"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        refused = requests.get(path, headers=headers)
        error = error_of(refused, 401, "unauthorized")
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert error["type"] == "authentication_error"
    for key in (KEY, OTHER_KEY):  # past auth: the model is unknown
        error_of(
            requests.get(path, headers={"Authorization": f"Bearer {key}"}), 404, "unknown_model"
        )
    # Probes and docs need no key.
    assert requests.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{gateway.url}/readyz").json()["status"] == "ready"
    served = requests.get(f"{gateway.url}/openapi.json").json()
    assert served == OPENAPI  # what schemathesis tests
    assert served["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert requests.get(f"{gateway.url}/docs").status_code == 200
    assert KEY not in caplog.text and OTHER_KEY not in caplog.text


def test_redis_down_is_503_and_the_process_stays_alive() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    with Gateway(GatewaySettings(redis_url=nobody, api_keys=[KEY])) as gw:
        assert requests.get(f"{gw.url}/healthz").status_code == 200
        error_of(requests.get(f"{gw.url}/readyz"), 503, "unavailable")
        submit = gw.post("/v1/jobs", {"model": "m", "input": {"text": "x"}})
        assert error_of(submit, 503, "unavailable")["type"] == "server_error"


def test_limits_and_the_one_error_shape(gateway: Gateway) -> None:
    big = {"model": "m", "input": {"text": "x" * MAX_BODY}}
    error_of(gateway.post("/v1/jobs", big), 413, "input_too_large")
    chunks = (b"x" * 8192 for _ in range(MAX_BODY // 8192 + 2))  # no Content-Length: chunked
    streamed = requests.post(
        f"{gateway.url}/v1/jobs", data=chunks, headers=AUTH | {"Content-Type": "application/json"}
    )
    error_of(streamed, 413, "input_too_large")
    too_many = {"model": "m", "jobs": [{"input": {"text": "x"}}] * (MAX_JOBS + 1)}
    over = error_of(gateway.post("/v1/jobs", too_many), 400, "invalid_input")
    assert f"limit of {MAX_JOBS}" in over["message"]
    # FastAPI's own validation errors, in the same shape (not its 422).
    bad_name = gateway.post("/v1/jobs", {"model": "Bad Name", "input": {}})
    assert "`model`" in error_of(bad_name, 400, "invalid_input")["message"]
    both = gateway.post("/v1/jobs", {"model": "m", "input": {}, "jobs": []})
    error_of(both, 400, "invalid_input")
    huge = gateway.post("/v1/jobs", {"model": "m", "input": {"n": 2**70}})  # past orjson
    assert "64-bit" in error_of(huge, 400, "invalid_input")["message"]
    not_json = requests.post(
        f"{gateway.url}/v1/embeddings",
        data=b"{nope",
        headers=AUTH | {"Content-Type": "application/json"},
    )
    error_of(not_json, 400, "invalid_input")
    error_of(gateway.get("/v1/nowhere"), 404, "not_found")
    wrong_method = requests.put(f"{gateway.url}/v1/jobs", headers=AUTH)
    error_of(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["Allow"] == "POST"
    options = requests.options(f"{gateway.url}/v1/jobs/m/x", headers=AUTH)
    error_of(options, 405, "method_not_allowed")
    assert options.headers["Allow"] == "DELETE, GET"  # two routes on one path


# The schema is the app's own document, built the way the `gateway` fixture builds its app (the
# Redis URL is not part of it): schemathesis' lazy `from_fixture` loader fails under pytest 9
# (it sets a private attribute pytest no longer has). test_api_keys checks that the served
# /openapi.json is this document.
OPENAPI = create_app(gateway_settings("redis://unused:1/0")).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@schema.hook
def filter_body(context: Any, body: Any) -> bool:
    """Only bodies the wire can carry. JSON Schema cannot say "integers within 64 bits, no lone
    surrogates", which the wire's JSON (orjson) requires: the gateway answers such a body 400
    (test_limits_and_the_one_error_shape), which the positive-data check would count as a
    valid request refused."""
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        return False
    return True


# One test per operation, each with its own id: `schema.parametrize()` gives every operation
# the same node id, and pytest-xdist (`make test` runs on several workers) then runs one of
# them only.
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_schemathesis_finds_no_server_error(operation: Any, gateway: Gateway, served: str) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: Any) -> None:
        aim_at(case, served)
        case.call_and_validate(base_url=gateway.url, headers=AUTH)

    check()


def aim_at(case: Any, model: str) -> None:
    """Names the served model wherever the case names a valid model (one name for another
    keeps a case valid, or invalid), so requests reach a real replica and real results, not
    only validation and `unknown_model`."""
    body = case.body
    if isinstance(body, dict) and valid_name(body.get("model")):
        body["model"] = model
        dims = body.get("dimensions")
        if isinstance(dims, int | float) and not isinstance(dims, bool) and dims >= 1:
            # Any integer is schema-valid, but only the model's own (32) is accepted.
            body["dimensions"] = 32
    params = case.path_parameters
    if params and valid_name(params.get("model")):
        params["model"] = model


def valid_name(value: Any) -> bool:
    return isinstance(value, str) and MODEL_NAME_RE.fullmatch(value) is not None


def test_serve_deployment_answers_through_a_handle(
    ray_serve: None, producer_url: str, served: str
) -> None:
    from ray import serve

    name = f"gateway-{uuid.uuid4().hex[:8]}"
    args = {"redis_url": producer_url, "gateway": {"models": [served, "not-deployed"]}}
    handle = serve.run(build_app(args), name=name, route_prefix=None)
    try:
        ready = handle.readiness.remote().result(timeout_s=60)
        assert ready == {"status": "ready", "models": {served: True, "not-deployed": False}}
    finally:
        serve.delete(name, _blocking=True)
