"""Wire protocol v1: keys, decoding, validation, results. No I/O."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from sluice.errors import InputTooLarge, InvalidInput, InvalidParams, JobExpired
from sluice.protocol import (
    BadEntry,
    Job,
    Result,
    check_model_name,
    dead_key,
    decode_embedding,
    decode_job,
    encode_embedding,
    encode_job_fields,
    error_result,
    jobs_key,
    result_key,
)
from sluice.settings import QueueSettings

LIMITS = QueueSettings()


def test_keys_share_the_model_hash_tag():
    assert jobs_key("minilm") == "sluice:{minilm}:jobs"
    assert result_key("minilm", "job-1") == "sluice:{minilm}:result:job-1"
    assert dead_key("minilm") == "sluice:{minilm}:dead"


@pytest.mark.parametrize("name", ["minilm", "a", "m.v2_x-1", "0" * 64])
def test_valid_model_names(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "MiniLM", "-x", "a b", "a{b}", "0" * 65])
def test_invalid_model_names(name):
    with pytest.raises(ValueError, match="model name must match"):
        check_model_name(name)


def test_decode_valid_job_roundtrips_the_encoder():
    fields = encode_job_fields(
        "job-1", {"text": "hi"}, params={"encoding": "base64"}, deadline_ms=123, reply_to="r:1"
    )
    job = decode_job("1700000000000-0", {k.encode(): v.encode() for k, v in fields.items()}, LIMITS)
    assert isinstance(job, Job)
    assert (job.id, job.input, job.params) == ("job-1", {"text": "hi"}, {"encoding": "base64"})
    assert (job.deadline_ms, job.reply_to, job.enqueued_ms) == (123, "r:1", 1700000000000)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({b"id": b"a"}, InvalidInput),
        ({b"id": b"a", b"input": b"{"}, InvalidInput),
        ({b"id": b"a", b"input": b"[]"}, InvalidInput),
        ({b"id": b"a", b"input": b'{"text": "\xff"}'}, InvalidInput),
        ({b"id": b"a", b"input": b"{}", b"params": b"nope"}, InvalidParams),
        ({b"id": b"a", b"input": b"{}", b"params": b"1"}, InvalidParams),
        ({b"id": b"a", b"input": b"{}", b"deadline_ms": b"x"}, InvalidInput),
        ({b"id": b"a", b"input": b"{}", b"deadline_ms": b"-5"}, InvalidInput),
        ({b"id": b"a", b"input": b"{}", b"reply_to": b"a b"}, InvalidInput),
        ({b"id": b"a", b"input": orjson.dumps({"text": "x" * 70_000})}, InputTooLarge),
        ({b"id": b"a", b"input": b"{}", b"params": orjson.dumps({"k": "v" * 5000})}, InputTooLarge),
    ],
)
def test_bad_entries_with_an_id_get_a_typed_error(fields, error):
    bad = decode_job("1-0", fields, LIMITS)
    assert isinstance(bad, BadEntry)
    assert bad.id == "a"
    assert type(bad.error) is error
    assert bad.error.message


@pytest.mark.parametrize(
    "fields",
    [{b"input": b"{}"}, {b"id": b""}, {b"id": b"a b"}, {b"id": b"\xff"}, {b"id": b"x" * 129}],
)
def test_entries_without_a_usable_id_have_none(fields):
    bad = decode_job("1-0", fields, LIMITS)
    assert isinstance(bad, BadEntry)
    assert bad.id is None


def test_encoder_refuses_bad_ids():
    with pytest.raises(InvalidInput):
        encode_job_fields("has space", {"text": "x"})


def test_job_expiry():
    job = Job(entry_id="1-0", id="a", input={}, params={}, deadline_ms=1000)
    assert job.expired(now_ms=1000) and not job.expired(now_ms=999)
    assert not Job(entry_id="1-0", id="a", input={}, params={}).expired()


def test_result_json_roundtrip_and_shapes():
    ok = Result("a", "m", "ok", output=np.arange(3, dtype=np.float32), timings={"total_ms": 1.5})
    body = orjson.loads(ok.to_json())
    assert body == {
        "id": "a",
        "model": "m",
        "status": "ok",
        "output": [0.0, 1.0, 2.0],
        "timings": {"total_ms": 1.5},
    }
    err = error_result("m", "b", InvalidInput("bad"))
    assert orjson.loads(err.to_json())["error"] == {"code": "invalid_input", "message": "bad"}
    expired = error_result("m", "c", JobExpired("late"))
    assert expired.status == "expired"
    assert expired.error == {"code": "expired", "message": "late"}
    assert Result.from_json(err.to_json()) == err


def test_embedding_encodings():
    vec = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    b64 = encode_embedding(vec, "base64")
    assert base64.b64decode(b64) == vec.astype("<f4").tobytes()
    np.testing.assert_array_equal(decode_embedding(b64), vec)
    np.testing.assert_array_equal(decode_embedding([0.5, -1.25, 3.0]), vec)
