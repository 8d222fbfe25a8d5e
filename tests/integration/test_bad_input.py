"""Bad input gets a clear error (or a dead letter), the batch around it runs, the replica lives."""

from __future__ import annotations

import time

import orjson
import pytest

from sluice.protocol import jobs_key
from tests.helpers import dead_letters, wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration

# (id, fields, expected error code) — every entry here carries a usable id.
WITH_ID = [
    ("no-input", {}, "invalid_input"),
    ("bad-json", {"input": "{not json"}, "invalid_input"),
    ("not-object", {"input": "[1, 2]"}, "invalid_input"),
    ("text-int", {"input": '{"text": 42}'}, "invalid_input"),
    ("extra-field", {"input": '{"text": "a", "image": "b"}'}, "invalid_input"),
    ("bad-utf8", {"input": b'{"text": "\xff\xfe"}'}, "invalid_input"),
    ("oversize", {"input": orjson.dumps({"text": "x" * 70_000})}, "input_too_large"),
    ("unknown-param", {"input": '{"text": "a"}', "params": '{"temperature": 1}'}, "invalid_params"),
    ("bad-encoding", {"input": '{"text": "a"}', "params": '{"encoding": "hex"}'}, "invalid_params"),
    ("params-list", {"input": '{"text": "a"}', "params": "[]"}, "invalid_params"),
    ("bad-deadline", {"input": '{"text": "a"}', "deadline_ms": "soon"}, "invalid_input"),
    ("bad-reply-to", {"input": '{"text": "a"}', "reply_to": "has space"}, "invalid_input"),
]
# No usable id: these can only become dead letters.
WITHOUT_ID = [
    {"input": '{"text": "orphan"}'},
    {"id": "", "input": '{"text": "empty id"}'},
    {"id": "bad id with spaces", "input": '{"text": "x"}'},
    {"id": "x" * 200, "input": '{"text": "too long id"}'},
    {"garbage": "\x00\x01"},
]


def test_malformed_entries_mixed_into_valid_stream(r, deploy, model_name, tiny_bert):
    handle = deploy(model_name, tiny_bert, max_batch_size=16)
    before = handle.info.remote().result()
    stream = jobs_key(model_name)

    valid: list[str] = []
    for round_ in range(3):
        valid += xadd_jobs(
            r, model_name, [f"valid {round_} {i}" for i in range(40)], prefix=f"ok{round_}"
        )
        for job_id, fields, _ in WITH_ID:
            r.xadd(stream, {"id": f"{job_id}-{round_}", **fields})
        for fields in WITHOUT_ID:
            r.xadd(stream, fields)
        # Expired before it is pulled: answered `expired`, never run.
        r.xadd(
            stream,
            {
                "id": f"late-{round_}",
                "input": '{"text": "late"}',
                "deadline_ms": str(int(time.time() * 1000) - 1),
            },
        )

    ok = wait_all_results(r, model_name, valid)
    assert {res["status"] for res in ok.values()} == {"ok"}

    bad_ids = [f"{job_id}-{n}" for n in range(3) for job_id, _, _ in WITH_ID]
    bad = wait_all_results(r, model_name, bad_ids)
    for n in range(3):
        for job_id, _, code in WITH_ID:
            res = bad[f"{job_id}-{n}"]
            assert res["status"] == "error", res
            assert res["error"]["code"] == code, res
            assert res["error"]["message"], res

    late = wait_all_results(r, model_name, [f"late-{n}" for n in range(3)])
    assert {res["status"] for res in late.values()} == {"expired"}

    letters = wait_for(
        lambda: (d := dead_letters(r, model_name)) and len(d) == 15 and d,
        20,
        what="15 dead letters",
    )
    assert all(d["reason"] and d["deliveries"] == "1" and d["entry_id"] for d in letters)
    assert any("missing field `id`" in d["reason"] for d in letters)

    after = handle.info.remote().result()
    assert after["pid"] == before["pid"], "the replica restarted"
    assert after["stats"]["redis_errors"] == 0
