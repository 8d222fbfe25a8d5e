"""Generation through the real queue and a real Serve app: greedy text equal to the model's own
`generate`, tokens streamed to the reply stream as they come (read while they arrive), stop
strings, seeds, and clear errors for bad jobs."""

from __future__ import annotations

import time

import orjson
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sluice.client import Client
from sluice.protocol import reply_key

pytestmark = pytest.mark.integration

PROMPTS = ["the quick brown fox", "a stream of", "café", "continuous batching keeps the"]


def hf_greedy(path: str, prompt: str, n: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=n)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


@pytest.fixture
def generator(deploy, model_name, tiny_generator):  # type: ignore[no-untyped-def]
    deploy(model_name, tiny_generator, task="generate", max_batch_size=8, max_new_tokens=64)
    return model_name


def test_greedy_generation_matches_the_models_own_generate(generator, tiny_generator, producer_url):
    lengths = [12, 3, 30, 7]
    with Client(producer_url) as client:
        ids = [
            client.submit(generator, {"prompt": p}, params={"max_new_tokens": n})
            for p, n in zip(PROMPTS, lengths, strict=True)
        ]
        results = client.wait(ids, timeout=60)

    for res, prompt, n in zip(results, PROMPTS, lengths, strict=True):
        assert res.status == "ok", res.error
        assert res.output["text"] == hf_greedy(tiny_generator, prompt, n)
        assert res.output["usage"]["completion_tokens"] <= n
        assert res.output["finish_reason"] in ("length", "eos")
        if res.output["finish_reason"] == "length":
            assert res.output["usage"]["completion_tokens"] == n
        assert res.timings["ttft_ms"] <= res.timings["total_ms"]
        assert res.timings["input_tokens"] == res.output["usage"]["prompt_tokens"] > 0


def read_stream_live(r, key: str, job_id: str, timeout_s: float = 60) -> list[tuple[int, dict]]:  # type: ignore[no-untyped-def]
    """Reads `key` as a client would, call by call: (call number, fields) per entry."""
    seen, last, call = [], "0-0", 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        call += 1
        for _, entries in r.xread({key: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                seen.append((call, {k.decode(): v.decode() for k, v in fields.items()}))
        if any("result" in f for _, f in seen):
            return seen
    raise AssertionError(f"no result on {key} in {timeout_s} s: {seen}")


def test_tokens_stream_to_the_reply_stream_before_the_one_result(generator, r, producer_url):
    reply = reply_key(f"gen-{generator}")
    with Client(producer_url) as client:
        job = client.submit(
            generator, {"prompt": "the quick brown fox"}, params={"max_new_tokens": 64}
        )
    # The SDK has its own reply stream; this job is re-sent raw with ours, as any producer may.
    job_id = f"{job}-raw"
    fields = {
        "id": job_id,
        "input": '{"prompt":"the quick brown fox"}',
        "params": '{"max_new_tokens":64}',
        "reply_to": reply,
    }
    r.xadd(f"sluice:{{{generator}}}:jobs", fields)

    seen = read_stream_live(r, reply, job_id)

    tokens = [f for _, f in seen if "token" in f]
    results = [f for _, f in seen if "result" in f]
    assert len(results) == 1 and "result" in seen[-1][1], "the result comes last, once"
    result = orjson.loads(results[0]["result"])
    assert result["status"] == "ok"
    assert [int(f["seq"]) for f in tokens] == sorted(int(f["seq"]) for f in tokens)
    assert {f["id"] for f in tokens} == {job_id} and {f["attempt"] for f in tokens} == {"1"}
    assert "".join(f["token"] for f in tokens) == result["output"]["text"]
    calls = {call for call, f in seen if "token" in f}
    assert len(calls) >= 2, "tokens were read while generation ran, not all at the end"
    assert min(calls) < seen[-1][0]


def test_stream_false_pushes_only_the_result(generator, r):
    reply = reply_key(f"quiet-{generator}")
    r.xadd(
        f"sluice:{{{generator}}}:jobs",
        {
            "id": "quiet",
            "input": '{"prompt":"a stream of"}',
            "params": '{"stream":false,"max_new_tokens":16}',
            "reply_to": reply,
        },
    )
    seen = read_stream_live(r, reply, "quiet")
    assert [list(f) for _, f in seen] == [["id", "result"]]


def test_stop_strings_and_seeds(generator, producer_url, tiny_generator):
    full = hf_greedy(tiny_generator, "the quick brown fox", 30)
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    with Client(producer_url) as client:
        stopped = client.submit(
            generator,
            {"prompt": "the quick brown fox"},
            params={"max_new_tokens": 30, "stop": [stop]},
        )
        sampled = [
            client.submit(
                generator,
                {"prompt": "a stream of"},
                params={"temperature": 1.0, "seed": seed, "max_new_tokens": 20},
            )
            for seed in (7, 7, 8)
        ]
        res, *samples = client.wait([stopped, *sampled], timeout=60)

    assert res.output["finish_reason"] == "stop"
    assert res.output["text"] == full[: full.find(stop)]
    assert samples[0].output["text"] == samples[1].output["text"], "same seed, same text"
    assert samples[0].output["text"] != samples[2].output["text"]


@pytest.mark.parametrize(
    ("job_input", "params", "code"),
    [
        ({"prompt": ""}, {}, "invalid_input"),
        ({"text": "hello"}, {}, "invalid_input"),
        ({"prompt": "hi"}, {"temperature": -1}, "invalid_params"),
        ({"prompt": "hi"}, {"max_new_tokens": 65}, "invalid_params"),
        ({"prompt": "hi"}, {"stop": ""}, "invalid_params"),
        ({"prompt": "hi"}, {"beam": 4}, "invalid_params"),
        ({"prompt": "word " * 300}, {}, "input_too_large"),
    ],
)
def test_bad_generation_jobs_get_clear_errors(generator, producer_url, job_input, params, code):
    with Client(producer_url) as client:
        (res,) = client.wait([client.submit(generator, job_input, params=params)], timeout=60)
    assert res.status == "error" and res.error["code"] == code, res


def test_one_id_queued_twice_runs_without_harm(generator, r, producer_url):
    from tests.helpers import group_pending, wait_all_results, wait_for

    fields = {"id": "twice", "input": '{"prompt":"a stream of"}', "params": '{"max_new_tokens":32}'}
    r.xadd(f"sluice:{{{generator}}}:jobs", fields)
    r.xadd(f"sluice:{{{generator}}}:jobs", fields)

    (result,) = wait_all_results(r, generator, ["twice"]).values()
    assert result["status"] == "ok"
    wait_for(lambda: group_pending(r, generator) == 0, 30, what="both entries acked")
    with Client(producer_url) as client:  # the replica serves on
        (after,) = client.wait([client.submit(generator, {"prompt": "hello"})], timeout=60)
    assert after.status == "ok"
