"""5,000 malformed entries interleaved with 5,000 valid ones: 5,000 `ok` results, an `error`
result for every malformed entry with a usable id, a dead letter for every one without, and
the replica never restarts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sluice.protocol import jobs_key
from tests.checker import check_exactly_once

pytestmark = pytest.mark.integration

N = 5000
MAX_INPUT_BYTES = 1024
OK_INPUT = '{"text": "fine"}'
REPLY_FIELD = "reply_to"

# (kind, fields, expected error code): each entry carries a usable id, added per entry.
WITH_ID: list[tuple[str, dict[str, Any], str]] = [
    ("bad-json", {"input": "{not json"}, "invalid_input"),
    ("no-input", {}, "invalid_input"),
    ("not-object", {"input": "[1, 2]"}, "invalid_input"),
    ("text-int", {"input": '{"text": 42}'}, "invalid_input"),
    ("extra-field", {"input": '{"text": "a", "image": "b"}'}, "invalid_input"),
    ("bad-utf8", {"input": b'{"text": "\xff\xfe"}'}, "invalid_input"),
    ("oversize", {"input": orjson.dumps({"text": "x" * MAX_INPUT_BYTES})}, "input_too_large"),
    ("bad-params", {"input": OK_INPUT, "params": "{nope"}, "invalid_params"),
    ("params-list", {"input": OK_INPUT, "params": "[]"}, "invalid_params"),
    ("unknown-param", {"input": OK_INPUT, "params": '{"temperature": 1}'}, "invalid_params"),
    ("bad-deadline", {"input": OK_INPUT, "deadline_ms": "soon"}, "invalid_input"),
    ("zero-deadline", {"input": OK_INPUT, "deadline_ms": "0"}, "invalid_input"),
    # No reply can be pushed to a bad reply_to: its error result is only stored.
    ("bad-reply-to", {"input": OK_INPUT, REPLY_FIELD: "has space"}, "invalid_input"),
]
# No usable id: only a dead letter can record these.
WITHOUT_ID: list[dict[str, Any]] = [
    {"input": OK_INPUT},
    {"id": "", "input": OK_INPUT},
    {"id": "bad id!", "input": OK_INPUT},
    {"id": "x" * 200, "input": OK_INPUT},
    {"id": b"\xff\xfe", "input": OK_INPUT},
    {"garbage": "\x00\x01"},
]
KINDS = len(WITH_ID) + len(WITHOUT_ID)


def test_malformed_flood_never_restarts_the_replica(r, deploy, model_name, tiny_bert):
    handle = deploy(
        model_name,
        tiny_bert,
        max_batch_size=64,
        # The replies of all 10,000 entries fit on the reply stream (approximate MAXLEN).
        queue={"max_input_bytes": MAX_INPUT_BYTES, "reply_maxlen": 100_000},
    )
    before = handle.info.remote().result(timeout_s=30)
    reply = f"sluice:reply:{model_name}"
    valid, bad, expected_code, orphans = _flood(r, model_name, reply)
    assert len(valid) == N and len(bad) + orphans == N

    report = check_exactly_once(
        r,
        model_name,
        valid + bad,
        reply_streams=[reply],
        expect_pushed=[i for i in valid + bad if not i.startswith("bad-reply-to")],
        allow_dead=True,  # the entries with no id; checked apart below
        timeout_s=120,
    )
    assert report.ok == N and all(report.results[i]["status"] == "ok" for i in valid)
    wrong = {
        i: report.results[i]
        for i in bad
        if report.results[i]["status"] != "error"
        or report.results[i]["error"]["code"] != expected_code[i]
    }
    assert not wrong, f"{len(wrong)} malformed entries got the wrong answer: {list(wrong)[:5]}"
    # Every entry with no usable id is one dead letter with its reason; nothing with an id is.
    assert not report.dead
    assert len(report.dead_without_id) == orphans
    assert all(d["lane"] == "normal" and d["deliveries"] == "1" for d in report.dead_without_id)

    after = handle.info.remote().result(timeout_s=30)
    assert after["pid"] == before["pid"], "the replica restarted"
    assert after["stats"]["started_at"] == before["stats"]["started_at"]
    assert after["stats"]["dead_letters"] == orphans
    assert after["stats"]["ok"] == N and after["stats"]["redis_errors"] == 0


def _flood(r: Any, model: str, reply: str) -> tuple[list[str], list[str], dict[str, str], int]:
    """Valid and malformed entries alternately, as raw XADDs; returns the valid ids, the
    malformed ids, each malformed id's expected code, and how many had no usable id."""
    valid: list[str] = []
    bad: list[str] = []
    expected: dict[str, str] = {}
    orphans = 0
    stream = jobs_key(model)
    with r.pipeline(transaction=False) as pipe:
        for n in range(N):
            job_id = f"ok-{n}"
            text = orjson.dumps({"text": f"valid {n} " + "pad " * (n % 20)})
            pipe.xadd(stream, {"id": job_id, "input": text, REPLY_FIELD: reply})
            valid.append(job_id)
            kind = n % KINDS
            if kind < len(WITH_ID):
                name, fields, code = WITH_ID[kind]
                job_id = f"{name}-{n}"
                pipe.xadd(stream, {"id": job_id, REPLY_FIELD: reply, **fields})
                bad.append(job_id)
                expected[job_id] = code
            else:
                pipe.xadd(stream, {**WITHOUT_ID[kind - len(WITH_ID)], REPLY_FIELD: reply})
                orphans += 1
            if n % 500 == 499:
                pipe.execute()
        pipe.execute()
    return valid, bad, expected, orphans
