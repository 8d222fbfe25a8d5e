"""The replica's hot-path encodings: packed commands and `ok` result JSON, byte for byte what
the slower general code gives. No I/O (tests/integration/test_wire.py sends them)."""

from __future__ import annotations

import base64
import random

import hiredis
import numpy as np
import pytest

from sluice.batching import Batch
from sluice.protocol import Job, Result, decode_fields
from sluice.queue import entry_of
from sluice.runners.base import Encoded
from sluice.running import Ran
from sluice.wire import pack, pack_set_nx_get


def random_arg(rng: random.Random) -> bytes | str | int | float:
    kind = rng.choice(["short", "long", "text", "int", "float", "empty"])
    if kind == "short":
        return rng.randbytes(rng.randint(1, 40))
    if kind == "long":
        return rng.randbytes(rng.randint(1025, 9000))  # sent out of line
    if kind == "text":
        return "".join(rng.choice("aé€𝄞 \r\n$*") for _ in range(rng.randint(1, 30)))
    if kind == "int":
        return rng.randint(-(10**12), 10**12)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    return b""


def test_pack_gives_hiredis_bytes_for_any_mix_of_arguments() -> None:
    rng = random.Random(7)
    for _ in range(300):
        commands = [
            tuple(random_arg(rng) for _ in range(rng.randint(1, 9)))
            for _ in range(rng.randint(1, 6))
        ]
        want = b"".join(hiredis.pack_command(c) for c in commands)
        assert b"".join(pack(commands)) == want


def test_a_long_value_is_its_own_part_not_copied() -> None:
    value = b"x" * 5000
    parts = pack([("SET", "k", value, "NX")])
    assert any(part is value for part in parts)


@pytest.mark.parametrize("ttl_s", [1, 86_400, 10**9])
def test_pack_set_nx_get_equals_the_general_packing(ttl_s: int) -> None:
    keys = ["sluice:{m}:result:a", "sluice:{m}:result:é€", "k" * 300]
    values = [b"{}", b"v" * 4000, "ü".encode() * 700]
    commands = [("SET", k, v, "NX", "GET", "EX", ttl_s) for k, v in zip(keys, values, strict=True)]
    assert b"".join(pack_set_nx_get(keys, values, ttl_s)) == b"".join(pack(commands))


def job(job_id: str, i: int) -> Job:
    return Job(f"1700000000{i:03d}-0", job_id, {"text": "x"}, {}, enqueued_ms=1_700_000_000_000)


@pytest.mark.parametrize(
    "output",
    [
        np.linspace(-1, 1, 384, dtype=np.float32),
        base64.b64encode(np.ones(8, np.float32).tobytes()).decode(),
        {"label": "POSITIVE", "score": 0.5, "scores": {"a": 1e-9}},
        'generated text with "quotes", \\ and ünïcode',
    ],
)
def test_ok_results_are_byte_for_byte_those_of_result_to_json(output: object) -> None:
    ids = ["plain", 'we"ird\\id', "ü-id"]
    items = [Encoded(job(j, i), 3, None) for i, j in enumerate(ids)]
    ran = Ran(Batch(items), [output] * len(ids), 1_700_000_000_100.0, 1_700_000_000_112.5)
    for item, outcome in zip(items, ran.outcomes("mini.lm"), strict=True):
        timings = ran._timings(item)
        want = Result(item.job.id, "mini.lm", "ok", output=output, timings=timings).to_json()
        assert outcome.result_json == want
        assert (outcome.status, outcome.code, outcome.timings) == ("ok", "", timings)


def test_decode_fields_fast_path_and_its_fallback_agree() -> None:
    clean = {b"id": b"a", b"input": '{"text": "é"}'.encode()}
    assert decode_fields(clean) == ({"id": "a", "input": '{"text": "é"}'}, set())
    mixed = {b"id": b"a", "input": "str already", b"bad": b"\xff\xfe"}
    fields, invalid = decode_fields(mixed)
    assert fields == {"id": "a", "input": "str already", "bad": "\ufffd\ufffd"}
    assert invalid == {"bad"}


def test_entry_of_still_sees_a_field_given_twice() -> None:
    once = entry_of(b"1-0", [b"id", b"a", b"input", b"{}"], 1)
    assert once.fields == {b"id": b"a", b"input": b"{}"} and not once.repeated
    twice = entry_of(b"1-1", [b"id", b"a", b"input", b"{}", b"id", b"b"], 1)
    assert twice.fields[b"id"] == b"b" and twice.repeated == frozenset({"id"})
    odd = entry_of(b"1-2", [b"id", b"a", b"dangling"], 1)
    assert odd.fields == {b"id": b"a"}
