"""Text generation: a causal LM served with continuous batching (decoding.py) and streaming.

Input `{"prompt": str}`, or `{"messages": [{"role", "content"}, ...]}`: a chat, put through
the model's own chat template up to the start of the assistant's turn (roles system, user,
assistant). Params (all optional):

    max_new_tokens  1 .. the model's `max_new_tokens` setting (default: that setting)
    temperature     0 (greedy, the default) .. 2
    top_p           (0, 1], nucleus sampling when temperature > 0 (default 1)
    stop            a string or a list of up to 4 strings of 1 to 256 characters: the output
                    ends before the first one
    seed            an integer: the same seed, prompt and settings give the same text
    stream          true (default) / false: push text deltas to `reply_to` as they come
    ignore_eos      true / false (default): generate `max_new_tokens` even past an end-of-
                    sequence token, as vLLM's param of that name does (for benchmarks: every
                    system then makes the same number of tokens)

Output: `{"text", "finish_reason": "eos" | "length" | "stop", "usage": {"prompt_tokens",
"completion_tokens"}}`. A prompt that leaves no room for one new token inside the model's
context (`max_length`, default `max_position_embeddings`) is refused, `input_too_large`; a
prompt plus `max_new_tokens` over the context gets the tokens that fit.

The quality gate's metric: the perplexity ratio, fp32's perplexity on the probe texts ÷ the
candidate's (1.0: as good; 0.98, the floor: 2% more perplexed). Not the share of greedy next
tokens that agree with fp32's: a near-tie flips under any rounding without making the text
any worse. On SmolLM2-135M-Instruct, bf16 flips 3.5% of greedy picks (agreement 0.965) while
its perplexity moves by 0.5% (ratio 0.995); int8 or int4 weights that damage the model move
the perplexity, which is what quantisation work (GPTQ, AWQ, llama.cpp's `perplexity`) reports.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sluice.errors import InputTooLarge, InvalidInput, InvalidParams, SluiceError
from sluice.protocol import Job
from sluice.runners.base import ContinuousRunner, Encoded, Progress
from sluice.runners.decoding import ContinuousBatcher, GenEvent, GenRequest
from sluice.runners.probes import PROBE_TEXTS


@dataclass(slots=True)
class _Running:
    """A job in the batcher: its deltas so far, numbered."""

    item: Encoded
    seq: int = 0
    text: str = ""


PARAMS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "stop", "seed", "stream", "ignore_eos"}
)
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # each step looks for every stop string in the text's tail
MAX_MESSAGES = 256
ROLES = frozenset({"system", "user", "assistant"})


class GenerateRunner(ContinuousRunner):
    """`{"prompt": str}` in, generated text out, token by token."""

    task: ClassVar[str] = "generate"
    quality_metric: ClassVar[str] = "perplexity_ratio"
    quality_floor: ClassVar[float] = 0.98

    def load_assets(self, path: str) -> None:
        source = self.files.pretrained_kwargs()  # a GGUF file's name too, if it is one
        self.tokenizer = AutoTokenizer.from_pretrained(path, **source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = AutoConfig.from_pretrained(path, **source)
        limit = int(getattr(config, "max_position_embeddings", 2048))
        self.max_length = min(self.settings.max_length or limit, limit)
        self._running: dict[str, _Running] = {}

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        source = self.files.pretrained_kwargs()
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **source)
        loaded: torch.nn.Module = model.to(self.device).eval()  # type: ignore[arg-type]
        return loaded

    def load(self) -> None:
        super().load()
        self.batcher = self._new_batcher()

    def _new_batcher(self) -> ContinuousBatcher:
        # Made after the gate: the scheduler drives whichever model it kept.
        return ContinuousBatcher(
            self.model,  # type: ignore[arg-type]
            self.tokenizer,
            max_batch=self.settings.max_batch_size,
            max_batch_tokens=self.settings.max_batch_tokens,
            device=self.device,
            prefix_cache_tokens=self.settings.prefix_cache_tokens,
            prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
        )

    # -- the quality gate ----------------------------------------------------------------------

    def probe(self) -> torch.Tensor:
        """The mean negative log-likelihood of the probe texts' tokens, teacher-forced."""
        assert self.model is not None, "load() first"
        # Right padding: every text's real tokens keep positions 0, 1, ...
        batch = self.tokenizer(
            list(PROBE_TEXTS), return_tensors="pt", padding=True, padding_side="right"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"]
        real = (mask[:, 1:] * mask[:, :-1]).bool()  # a real token predicted from a real one
        nll = -log_probs.gather(-1, targets[..., None])[..., 0][real]
        return nll.mean().cpu()

    def quality(self, reference: torch.Tensor, candidate: torch.Tensor) -> float:
        """fp32's perplexity ÷ the candidate's: exp(reference NLL - candidate NLL)."""
        return float(torch.exp(reference - candidate))

    # -- jobs --------------------------------------------------------------------------------

    def encode(self, jobs: Sequence[Job]) -> list[Encoded | SluiceError]:
        out: list[Encoded | SluiceError] = []
        for job in jobs:
            try:
                out.append(self._encode_one(job))
            except SluiceError as err:
                out.append(err)
        return out

    def _encode_one(self, job: Job) -> Encoded:
        fields = set(job.input)
        if fields not in ({"prompt"}, {"messages"}):
            raise InvalidInput(
                f"input must have exactly one of `prompt` (text) or `messages` (a chat), "
                f"got fields {sorted(fields)[:8]}"
            )
        request = self._request(job)
        if "messages" in fields:
            request.prompt_ids = self._chat_ids(job.input["messages"])
        else:
            prompt = job.input["prompt"]
            if not isinstance(prompt, str) or not prompt:
                raise InvalidInput("input.prompt must be a non-empty string")
            request.prompt_ids = list(self.tokenizer(prompt)["input_ids"])
        room = self.max_length - len(request.prompt_ids)
        if room < 1:
            raise InputTooLarge(
                f"the prompt is {len(request.prompt_ids)} tokens; the model's context is "
                f"{self.max_length}, with no room left to generate"
            )
        request.max_new_tokens = min(request.max_new_tokens, room)
        return Encoded(job, len(request.prompt_ids), request)

    def _chat_ids(self, messages: Any) -> list[int]:
        """The token ids of a chat through the model's own chat template, ending where the
        assistant's turn begins (as `transformers`' chat pipeline and OpenAI servers do)."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidInput("this model has no chat template: send `prompt` instead")
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
            raise InvalidInput(f"input.messages must be a list of 1 to {MAX_MESSAGES} messages")
        chat = []
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or set(message) != {"role", "content"}
                or message["role"] not in ROLES
                or not isinstance(message["content"], str)
            ):
                raise InvalidInput(
                    f"input.messages[{i}] must be {{role, content}} with role one of "
                    f"{sorted(ROLES)} and content a string"
                )
            chat.append({"role": message["role"], "content": message["content"]})
        encoded: Any = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(i) for i in encoded["input_ids"]]

    def _request(self, job: Job) -> GenRequest:
        p = job.params
        unknown = set(p) - PARAMS
        if unknown:
            raise InvalidParams(f"unknown params {sorted(unknown)}; allowed: {sorted(PARAMS)}")
        cap = self.settings.max_new_tokens
        max_new = _number(p, "max_new_tokens", int, 1, cap, cap)
        temperature = _number(p, "temperature", float, 0.0, 2.0, 0.0)
        top_p = _number(p, "top_p", float, 0.0, 1.0, 1.0)
        if top_p <= 0:
            raise InvalidParams("params.top_p must be above 0 and at most 1")
        seed = p.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise InvalidParams(f"params.seed must be a non-negative integer, got {seed!r}")
        for flag in ("stream", "ignore_eos"):
            if not isinstance(p.get(flag, False), bool):
                raise InvalidParams(f"params.{flag} must be true or false")
        # Keyed by the entry, not the job id: the same id queued twice runs twice (the first
        # result wins at SET NX), where one key would make the scheduler refuse the second.
        key = f"{job.lane}/{job.entry_id}"
        stops = _stops(p.get("stop"))
        ignore_eos = bool(p.get("ignore_eos", False))
        return GenRequest(key, [], max_new, temperature, top_p, stops, seed, ignore_eos)

    def admit(self, items: Sequence[Encoded]) -> None:
        for item in items:
            if item.data.key in self._running:
                continue  # the same entry delivered again while it runs: one run is enough
            self._running[item.data.key] = _Running(item)
            self.batcher.add(item.data)

    @property
    def waiting(self) -> int:
        return self.batcher.pending

    @property
    def running(self) -> int:
        return self.batcher.active

    @property
    def idle(self) -> bool:
        return self.batcher.idle

    def abandon(self) -> list[Encoded]:
        items = [state.item for state in self._running.values()]
        self._running.clear()
        self.batcher = self._new_batcher()
        return items

    def cancel(self, job_ids: Collection[str]) -> list[Encoded]:
        dropped = [key for key, state in self._running.items() if state.item.job.id in job_ids]
        for key in dropped:
            self.batcher.cancel(key)
        return [self._running.pop(key).item for key in dropped]

    def step(self) -> list[Progress]:
        return [self._progress(event) for event in self.batcher.step()]

    def _progress(self, event: GenEvent) -> Progress:
        state = self._running[event.key]
        state.text += event.text
        seq, state.seq = state.seq, state.seq + 1
        if not event.finished:
            return Progress(state.item, event.text, seq)
        del self._running[event.key]
        output = {
            "text": state.text,
            "finish_reason": event.finish_reason,
            "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.generated},
        }
        timings = {"completion_tokens": float(event.generated)}
        if event.first_token_s is not None:
            # The batcher's clock is monotonic; results carry wall-clock ms like the rest.
            ago_s = time.monotonic() - event.first_token_s
            timings["first_token_ms"] = round((time.time() - ago_s) * 1000, 3)
        return Progress(state.item, event.text, seq, output, timings)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_length": self.max_length}


def _number(
    params: dict[str, Any], name: str, kind: type, low: float, high: float, default: Any
) -> Any:
    value = params.get(name, default)
    ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    if not ok_type or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise InvalidParams(f"params.{name} must be {what} from {low:g} to {high:g}, got {value!r}")
    return kind(value)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise InvalidParams(
            f"params.stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of "
            f"1 to {MAX_STOPS} of them"
        )
    return tuple(stops)
