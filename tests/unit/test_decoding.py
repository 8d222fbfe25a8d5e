"""Continuous batching against `model.generate`, on a tiny random Qwen2 and a byte-level BPE."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from sluice.runners.decoding import ContinuousBatcher, GenEvent, GenRequest, _delta
from tests.conftest import build_tiny_tokenizer

build_tokenizer = build_tiny_tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    # A large init makes attention sharp, so wrong positions or masks change the greedy tokens.
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    lm = Qwen2ForCausalLM(config).eval()
    lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    return build_model(tokenizer)


def greedy(model: Qwen2ForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_length=0
    )
    return [int(t) for t in out[0, len(prompt) :]]


def prompt(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def drain(batcher: ContinuousBatcher, limit: int = 500) -> list[GenEvent]:
    events: list[GenEvent] = []
    for _ in range(limit):
        if batcher.idle:
            return events
        events += batcher.step()
    raise AssertionError("batcher did not go idle")


def collect(events: Iterable[GenEvent]) -> dict[str, list[GenEvent]]:
    by_key: dict[str, list[GenEvent]] = {}
    for event in events:
        by_key.setdefault(event.key, []).append(event)
    return by_key


def ids_of(events: list[GenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


PROMPTS = [
    "the quick brown",
    "a stream",
    "continuous batching keeps the accelerator busy and the queue short",
    "naïve café",
    "fox",
    "the lazy dog jumps over the quick brown fox while the gate",
]


def test_greedy_matches_generate_with_late_arrivals(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer, max_batch=8, eos_token_ids=())
    lengths = [12, 5, 9, 14, 3, 10]
    requests = [
        GenRequest(f"r{i}", prompt(tokenizer, text), n)
        for i, (text, n) in enumerate(zip(PROMPTS, lengths, strict=True))
    ]
    events: list[GenEvent] = []
    for request in requests[:3]:
        batcher.add(request)
    for _ in range(4):
        events += batcher.step()
    batcher.add(requests[3])
    events += batcher.step()
    for request in requests[4:]:
        batcher.add(request)
    events += drain(batcher)
    by_key = collect(events)
    for request in requests:
        got = by_key[request.key]
        assert ids_of(got) == greedy(model, request.prompt_ids, request.max_new_tokens)
        assert [e.finished for e in got] == [False] * (len(got) - 1) + [True]
        assert got[-1].finish_reason == "length"
        assert got[-1].generated == request.max_new_tokens
        assert got[-1].prompt_tokens == len(request.prompt_ids)
        assert "".join(e.text for e in got) == tokenizer.decode(ids_of(got))
    assert batcher.cache_len == 0


def test_length_eos_and_admission_limits(model, tokenizer) -> None:
    ids = prompt(tokenizer, PROMPTS[0])
    reference = greedy(model, ids, 12)
    # The first generated token not seen before it: make it the eos.
    k = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2, eos_token_ids=(reference[k],))
    batcher.add(GenRequest("eos", ids, 12))
    batcher.add(GenRequest("short", prompt(tokenizer, PROMPTS[1]), 1))
    batcher.add(GenRequest("third", prompt(tokenizer, PROMPTS[2]), 4))
    assert batcher.pending == 3
    batcher.step()
    assert batcher.active <= 2
    by_key = collect(drain(batcher))
    assert ids_of(by_key["eos"])[-1] == reference[k]
    assert by_key["eos"][-1].finish_reason == "eos"
    assert by_key["eos"][-1].generated == k + 1
    assert by_key["third"][-1].finish_reason == "length"
    assert by_key["third"][-1].generated == 4
    with pytest.raises(ValueError):
        batcher.add(GenRequest("bad", ids, 0))


def test_ignore_eos_runs_to_max_new_tokens_through_the_eos(model, tokenizer) -> None:
    ids = prompt(tokenizer, PROMPTS[0])
    reference = greedy(model, ids, 12)
    k = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    batcher = ContinuousBatcher(model, tokenizer, eos_token_ids=(reference[k],))
    batcher.add(GenRequest("through", ids, 12, ignore_eos=True))
    batcher.add(GenRequest("stops", ids, 12))
    by_key = collect(drain(batcher))
    assert ids_of(by_key["through"]) == reference  # the eos token and what follows it
    assert by_key["through"][-1].finish_reason == "length"
    assert by_key["stops"][-1].finish_reason == "eos"


def test_stop_string(model, tokenizer) -> None:
    ids = prompt(tokenizer, PROMPTS[2])
    full = tokenizer.decode(greedy(model, ids, 30))
    clean = [i for i in range(len(full) // 2, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, full
    stop = full[clean[0] : clean[0] + 2]
    expected = full[: full.index(stop)]
    batcher = ContinuousBatcher(model, tokenizer, eos_token_ids=())
    batcher.add(GenRequest("s", ids, 30, stop=("never-there", stop)))
    events = drain(batcher)
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop"
    assert all(e.key == "s" for e in events)
    assert events[-1].generated < 30


def sample_text(model, tokenizer, ids: list[int], **kwargs: object) -> list[int]:
    batcher = ContinuousBatcher(model, tokenizer, eos_token_ids=())
    batcher.add(GenRequest("x", ids, 10, **kwargs))  # type: ignore[arg-type]
    return ids_of(drain(batcher))


def test_sampling_seeded_and_top_p(model, tokenizer) -> None:
    ids = prompt(tokenizer, PROMPTS[0])
    reference = greedy(model, ids, 10)
    runs = [sample_text(model, tokenizer, ids, temperature=1.0, seed=seed) for seed in (1, 2, 3)]
    assert runs[0] == sample_text(model, tokenizer, ids, temperature=1.0, seed=1)
    assert any(run != reference for run in runs)
    narrow = sample_text(model, tokenizer, ids, temperature=1.0, top_p=1e-6, seed=4)
    assert narrow == reference


def test_cancel_mid_flight(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer, eos_token_ids=())
    requests = [GenRequest(f"c{i}", prompt(tokenizer, t), 8) for i, t in enumerate(PROMPTS[:3])]
    for request in requests:
        batcher.add(request)
    batcher.add(GenRequest("queued", prompt(tokenizer, PROMPTS[3]), 8))
    assert batcher.cancel("queued")
    events = batcher.step() + batcher.step()
    assert batcher.cancel("c1")
    assert not batcher.cancel("nobody")
    events += drain(batcher)
    by_key = collect(events)
    assert "queued" not in by_key
    assert len(by_key["c1"]) == 2 and not by_key["c1"][-1].finished
    for request in (requests[0], requests[2]):
        assert ids_of(by_key[request.key]) == greedy(model, request.prompt_ids, 8)
    assert batcher.idle


def test_cache_stays_bounded(model, tokenizer) -> None:
    rng = random.Random(0)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=4)
    lengths: dict[str, int] = {}
    for n in range(40):
        ids = [rng.randrange(2, len(tokenizer)) for _ in range(rng.randint(2, 9))]
        batcher.add(GenRequest(f"b{n}", ids, rng.randint(1, 6)))
        for event in batcher.step():
            if event.finished:
                lengths.pop(event.key, None)
            else:
                lengths[event.key] = event.prompt_tokens + event.generated
        # The newest token of each row is not in the cache yet.
        assert batcher.cache_len == max((n - 1 for n in lengths.values()), default=0)
    drain(batcher)
    assert batcher.cache_len == 0


def test_delta_holds_back_partial_chars_and_stop_prefixes() -> None:
    assert _delta("caf\ufffd", "", (), None) == ("caf", None)
    assert _delta("café", "caf", (), None) == ("é", None)
    assert _delta("say EN", "say", ("END",), None) == (" ", None)
    assert _delta("say ENDING", "say ", ("END",), None) == ("", "stop")
    assert _delta("say EN", "say ", ("END",), "length") == ("EN", "length")
    assert _delta("ab\ufffd", "a", (), "eos") == ("b\ufffd", "eos")


SHARED = (
    "continuous batching keeps the accelerator busy and the queue short; "
    "the quick brown fox jumps over the lazy dog near the sluice gate. "
)


def test_prefix_cache_reuses_shared_beginnings_and_changes_no_token(model, tokenizer) -> None:
    """Newcomers that begin like earlier prompts prefill only the rest (their first blocks
    come from the cache), alone or with others, whatever their padding; every request's
    greedy tokens are still `generate`'s."""
    from sluice.runners.prefixes import BLOCK

    batcher = ContinuousBatcher(
        model, tokenizer, max_batch=8, eos_token_ids=(), prefix_cache_tokens=4096
    )
    assert batcher.prefixes is not None
    tails = ["a stream", "fox", "naïve café and the gate", "the", "queue short", "x"]
    requests = [
        GenRequest(f"p{i}", prompt(tokenizer, SHARED + tail), 6 + i) for i, tail in enumerate(tails)
    ]
    assert len(requests[0].prompt_ids) > 2 * BLOCK
    unrelated = GenRequest("u", prompt(tokenizer, "naïve café"), 5)
    events: list[GenEvent] = []
    batcher.add(requests[0])  # a first prefill: nothing cached yet
    events += batcher.step()
    assert batcher.prefixes.hits == 0 and len(batcher.prefixes) >= 2
    batcher.add(requests[1])  # joins the running batch from the cache
    events += batcher.step()
    assert batcher.prefixes.hits >= 2 * BLOCK
    for request in [*requests[2:], unrelated]:  # several at once, and one with no hit
        batcher.add(request)
    events += drain(batcher)
    by_key = collect(events)
    for request in [*requests, unrelated]:
        want = greedy(model, request.prompt_ids, request.max_new_tokens)
        assert ids_of(by_key[request.key]) == want, request.key
    assert batcher.prefixes.hits >= 5 * 2 * BLOCK
    assert batcher.cache_len == 0


def test_a_tiny_prefix_cache_evicts_and_stays_correct(model, tokenizer) -> None:
    from sluice.runners.prefixes import BLOCK

    batcher = ContinuousBatcher(
        model, tokenizer, max_batch=2, eos_token_ids=(), prefix_cache_tokens=BLOCK
    )
    assert batcher.prefixes is not None
    for i, tail in enumerate(["one", "two", "three", "four"]):
        request = GenRequest(f"e{i}", prompt(tokenizer, f"{tail} {SHARED}"), 4)
        batcher.add(request)
        got = ids_of(collect(drain(batcher))[request.key])
        assert got == greedy(model, request.prompt_ids, 4)
        assert len(batcher.prefixes) <= 1


def test_chunked_prefill_keeps_running_streams_going(model, tokenizer) -> None:
    """A prompt longer than a chunk is prefilled a chunk a step; a stream that is running
    gets a token at every one of those steps; both equal `generate` token for token, and a
    newcomer that begins like the long prompt finds its blocks once it is in."""
    chunk = 16
    batcher = ContinuousBatcher(
        model, tokenizer, eos_token_ids=(), prefix_cache_tokens=4096, prefill_chunk_tokens=chunk
    )
    running = GenRequest("running", prompt(tokenizer, "a stream"), 40)
    long_ids = prompt(tokenizer, SHARED * 3)
    assert len(long_ids) > 5 * chunk
    long = GenRequest("long", long_ids, 5)
    batcher.add(running)
    events = batcher.step()
    batcher.add(long)
    steps_to_first = 0
    while not any(e.key == "long" for e in events[-1:]) and steps_to_first < 50:
        step = batcher.step()
        steps_to_first += 1
        assert any(e.key == "running" for e in step), "the running stream stalled"
        events += step
        if any(e.key == "long" for e in step):
            break
    assert steps_to_first == -(-len(long_ids) // chunk)  # one chunk a step
    later = GenRequest("later", prompt(tokenizer, SHARED * 3 + " fox"), 3)
    batcher.add(later)
    events += drain(batcher)
    by_key = collect(events)
    for request in (running, long, later):
        want = greedy(model, request.prompt_ids, request.max_new_tokens)
        assert ids_of(by_key[request.key]) == want, request.key
    assert batcher.prefixes is not None and batcher.prefixes.hits >= len(long_ids) - chunk


def test_a_hit_survives_the_eviction_an_earlier_group_causes(model, tokenizer) -> None:
    """Two groups admitted in one step: the first (no hit) stores blocks that evict the
    second's cached beginning before its prefill; the second uses what it looked up."""
    from sluice.runners.prefixes import BLOCK

    batcher = ContinuousBatcher(model, tokenizer, eos_token_ids=(), prefix_cache_tokens=2 * BLOCK)
    first = GenRequest("first", prompt(tokenizer, SHARED), 2)
    batcher.add(first)
    drain(batcher)
    assert batcher.prefixes is not None and len(batcher.prefixes) == 2
    unrelated = GenRequest("unrelated", prompt(tokenizer, "naïve café " + SHARED[::-1]), 4)
    hit = GenRequest("hit", prompt(tokenizer, SHARED + " fox"), 4)
    assert len(unrelated.prompt_ids) >= 2 * BLOCK
    batcher.add(unrelated)  # admitted first: its group is prefilled (and stored) first
    batcher.add(hit)
    by_key = collect(drain(batcher))
    for request in (unrelated, hit):
        want = greedy(model, request.prompt_ids, request.max_new_tokens)
        assert ids_of(by_key[request.key]) == want
    assert batcher.prefixes.hits >= 2 * BLOCK


def test_padding_left_in_the_middle_is_trimmed_once_its_partners_leave(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer, eos_token_ids=(), prefix_cache_tokens=4096)
    batcher.add(GenRequest("seed", prompt(tokenizer, SHARED), 1))
    drain(batcher)
    short = GenRequest("short", prompt(tokenizer, SHARED + "x"), 12)
    long = GenRequest("long", prompt(tokenizer, SHARED + " the lazy dog " * 6), 2)
    batcher.add(short)
    batcher.add(long)  # one group: the short row pads between its beginning and its rest
    events = batcher.step()
    events += batcher.step()
    events += batcher.step()  # "long" is done; "short" runs on alone
    assert batcher.active == 1
    assert batcher.cache_len == len(short.prompt_ids) + 2  # no padding column left
    by_key = collect(events + drain(batcher))
    assert ids_of(by_key["short"]) == greedy(model, short.prompt_ids, 12)
