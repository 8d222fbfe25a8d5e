"""The gateway's parts that need no Redis and no Ray: settings, the error shape against
errors.TABLE, API-key checks, request shapes, the OpenAPI document, and docs/gateway.md's
limits table against the code. tests/integration/test_gateway.py runs it for real."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import orjson
import pytest
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import SecretStr, ValidationError

from sluice.errors import TABLE, Overloaded, Unauthorized, from_wire
from sluice.gateway import build_app, create_app
from sluice.gateway.bodies import EmbeddingRequest
from sluice.gateway.http import error_response, key_check, validation_message
from sluice.settings import GatewayOptions, GatewaySettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEYS", " key-1, key-2 ,,")
    monkeypatch.setenv("SLUICE_GATEWAY__MODELS", "minilm,other")
    monkeypatch.setenv("SLUICE_GATEWAY__MAX_JOBS_PER_REQUEST", "16")
    settings = GatewaySettings(gateway={"retry_after_s": 5})  # args merge with the env
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-1", "key-2"]
    assert "key-1" not in repr(settings)
    assert settings.gateway.models == ["minilm", "other"]
    assert (settings.gateway.max_jobs_per_request, settings.gateway.retry_after_s) == (16, 5)
    monkeypatch.setenv("SLUICE_API_KEYS", "")
    assert GatewaySettings().api_keys == []  # empty: auth off


@pytest.mark.parametrize(
    "args",
    [
        {"gateway": {"models": ["Bad Name"]}},
        {"gateway": {"max_jobs_per_request": 0}},
        {"gateway": {"surprise": 1}},
        {"surprise": True},
        {"api_keys": ["in-the-config"]},  # Ray stores and shows the Serve config
    ],
)
def test_bad_application_args_fail_the_deploy(args: dict[str, object]) -> None:
    with pytest.raises((ValidationError, ValueError)):
        build_app(args)


def test_good_application_args_build() -> None:
    from ray.serve import Application

    args = {"redis_url": "redis://u:p@h:6379/0", "gateway": {"models": ["minilm"]}}
    assert isinstance(build_app(args), Application)


@pytest.mark.parametrize("code", sorted(TABLE))
def test_every_code_answers_its_tables_status_in_the_one_shape(code: str) -> None:
    response = error_response(from_wire(code, "why"))
    assert response.status_code == TABLE[code].http_status
    error = orjson.loads(response.body)["error"]
    assert (error["code"], error["message"]) == (code, "why")
    assert error["type"] in (
        "invalid_request_error",
        "authentication_error",
        "rate_limit_error",
        "server_error",
    )


def test_429_and_401_carry_their_headers() -> None:
    full = error_response(Overloaded("full", accepted=["a"], rejected=["b"]), retry_after_s=7)
    assert full.headers["Retry-After"] == "7"
    error = orjson.loads(full.body)["error"]
    assert (error["accepted"], error["rejected"]) == (["a"], ["b"])
    assert error_response(Unauthorized("no")).headers["WWW-Authenticate"] == "Bearer"


def test_keys_are_checked() -> None:
    one, two = "key-one-0123456789abcdef", "key-two-0123456789abcdef"
    check = key_check([SecretStr(one), SecretStr(two)])

    def bearer(token: str) -> HTTPAuthorizationCredentials:
        return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)

    assert asyncio.run(check(bearer(one))) != asyncio.run(check(bearer(two)))  # two tenants
    for given in (bearer("k-3"), bearer(one + " "), bearer("ключ"), bearer("="), None):
        with pytest.raises(Unauthorized):
            asyncio.run(check(given))


def test_embedding_requests_refuse_token_arrays_clearly() -> None:
    assert EmbeddingRequest(model="m", input="one").input == "one"
    assert EmbeddingRequest(model="m", input=["a", "b"], user="u").input == ["a", "b"]
    for tokens in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(ValidationError, match="token arrays are not supported"):
            EmbeddingRequest(model="m", input=tokens)
    for empty in ("", [], [""]):
        with pytest.raises(ValidationError):
            EmbeddingRequest(model="m", input=empty)


def test_validation_messages_name_the_fields() -> None:
    errors = [
        {"loc": ("body", "many", "jobs", 0, "input"), "msg": "Field required"},
        {"loc": ("path", "model"), "msg": "String should match pattern"},
    ]
    assert validation_message(errors) == (
        "`jobs.0.input`: Field required; `model`: String should match pattern"
    )
    many = validation_message([{"loc": ("body", "x"), "msg": "bad"}] * 7)
    assert many.endswith("and 2 more")


@pytest.mark.parametrize("keys", [[], ["key-0123456789abcdef"]])
def test_the_openapi_document_describes_what_the_gateway_answers(keys: list[str]) -> None:
    app = create_app(GatewaySettings(api_keys=keys, gateway={"max_jobs_per_request": 9}))
    schema = app.openapi()
    assert '"422"' not in orjson.dumps(schema).decode(), "validation errors are 400s here"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "default" in responses and "400" in responses, (method, path)
            assert ("401" in responses) == (bool(keys) and path.startswith("/v1/"))
            assert ("security" in operation) == (bool(keys) and path.startswith("/v1/"))
    components = schema["components"]["schemas"]
    assert components["SubmitMany"]["properties"]["jobs"]["maxItems"] == 9
    texts = components["EmbeddingRequest"]["properties"]["input"]["anyOf"]
    assert [t.get("maxItems") for t in texts if t.get("type") == "array"] == [9]
    rejected = schema["paths"]["/v1/jobs"]["post"]["responses"]["429"]
    assert "Retry-After" in rejected["headers"]


def test_the_docs_limits_table_matches_the_settings() -> None:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `gateway.") and len(cells) == 5:
            rows[cells[0].strip("`").removeprefix("gateway.")] = cells
    assert set(rows) == set(GatewayOptions.model_fields), "docs/gateway.md's limits table"
    for name, (_, default, env, yaml, _what) in rows.items():
        assert f"SLUICE_GATEWAY__{name.upper()}" in env and f"args.gateway.{name}" in yaml
        value = GatewayOptions.model_fields[name].default
        stated = re.match(r"`([^`]+)`", default)
        if value is None:
            assert stated is None, name
        else:
            assert stated is not None and float(stated.group(1)) == float(value), name


def test_auth_off_is_said_loudly(caplog: pytest.LogCaptureFixture) -> None:
    create_app(GatewaySettings(api_keys=[]))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in warnings)
    caplog.clear()
    create_app(GatewaySettings(api_keys=["secret-key-0123456789"]))
    assert "AUTHENTICATION IS OFF" not in caplog.text and "secret-key" not in caplog.text


def test_api_key_entries_name_their_tenant_or_are_one_of_their_own() -> None:
    from sluice.gateway.http import parse_key, tenant_of

    assert parse_key("team-a:s3cret-s3cret-s3cret") == ("team-a", b"s3cret-s3cret-s3cret")
    # A bare key, base64 padding included, is never split: a tenant of its own.
    key = "QUJDREVGR0hJSktMTU5PUA=="
    assert parse_key(key) == (tenant_of(key.encode()), key.encode())
    assert tenant_of(b"k1") != tenant_of(b"k2") and len(tenant_of(b"k1")) == 13
    for weak in ("short", "team-a:short", "team-a:" + "=" * 20):
        with pytest.raises(ValueError, match=r"characters|API key"):
            parse_key(weak)
    with pytest.raises(ValueError, match="derived"):
        parse_key("k0123456789ab:" + "x" * 20)
