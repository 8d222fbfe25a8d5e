"""Continuous batching (iteration-level scheduling) for a Hugging Face causal LM, with streaming.

Not transformers' `init_continuous_batching()` (5.23, tried on CPU): by default its paged-cache
sizing gave no result for ~23 s; per-request `temperature`/`top_p` were rejected ("Unknown
logit_processor_kwargs ... supported_keys = {}") unless `per_request_processors=True`, and then a
per-request `temperature=0.0` put NaN into `torch.multinomial`, killing its thread and every later
request. It has no per-request seed and no stop strings.

Ours: active rows share one left-padded `DynamicCache`. `step()` decodes one token for every active
row, then prefills admitted prompts together (first token from the prefill logits) and merges their
cache in; finished rows are cut out and all-padding columns trimmed, so the cache stays bounded.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from sluice.runners.prefixes import Hit, PrefixCache

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GenRequest:
    """One generation request; its key must be unique among pending and active requests."""

    key: str  # the caller's id
    prompt_ids: list[int]  # non-empty
    max_new_tokens: int  # >= 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; used when temperature > 0
    stop: tuple[str, ...] = ()  # the output ends before the first of these that appears
    seed: int | None = None  # seeds this request's own sampling generator
    ignore_eos: bool = False  # run to max_new_tokens whatever the model says (benchmarks)


@dataclass(slots=True)
class GenEvent:
    """What one request produced in one step; a request's text deltas sum to its final text."""

    key: str
    text: str  # new text since this request's previous event ("" while held back)
    token_ids: list[int]  # new token ids since this request's previous event
    finished: bool  # True on the request's last event
    finish_reason: str | None  # "eos" | "length" | "stop"; None while running
    generated: int  # tokens generated so far
    prompt_tokens: int
    first_token_s: float | None  # time.monotonic() at the request's first token


@dataclass(slots=True)
class _Seq:
    req: GenRequest
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    first_token_s: float | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class _Fill:
    """A newcomer whose prompt is longer than a step's prefill chunk: prefilled a chunk a step,
    in a cache of its own, so that the running rows still get a token every step."""

    seq: _Seq
    cache: DynamicCache
    done: int  # prompt tokens in its cache so far


class ContinuousBatcher:
    """Schedules generation requests onto one batched forward pass per step.

    `add` and `cancel` may be called from any thread; `step` from one model thread only.

    Args:
        model: A decoder-only model in eval mode whose cache is a plain `DynamicCache`.
        tokenizer: Its tokenizer (for detokenisation and eos/pad ids).
        max_batch: Most active sequences.
        max_batch_tokens: Most prompt tokens prefilled in one step, counted padded to the longest
            newcomer (a longer prompt is admitted alone).
        device: Where input tensors go; defaults to `model.device`.
        eos_token_ids: Token ids that end a sequence; None takes the model's and tokenizer's,
            an empty collection disables eos.
        prefix_cache_tokens: Prompt tokens whose keys and values are kept for newcomers that
            begin the same way (prefixes.py); 0 turns prefix caching off.
        prefill_chunk_tokens: The most prompt tokens of long prompts prefilled in one step: a
            longer prompt is prefilled over several steps (chunked prefill), between which the
            running rows decode; 0 prefills every prompt whole.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 4096,
        device: torch.device | None = None,
        eos_token_ids: Collection[int] | None = None,
        prefix_cache_tokens: int = 0,
        prefill_chunk_tokens: int = 0,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.device = device if device is not None else model.device
        self._eos = set(_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self._pad_id = int(tokenizer.pad_token_id or 0)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.prefill_chunk_tokens = prefill_chunk_tokens
        _check_cache(model)
        if model.training:
            log.warning("model is in training mode; dropout makes decoding nondeterministic")
        self._lock = threading.Lock()
        self._pending: deque[GenRequest] = deque()
        self._active_keys: set[str] = set()
        self._cancelled: set[str] = set()
        # Owned by the model thread only.
        self._rows: list[_Seq] = []
        self._fills: list[_Fill] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None

    def add(self, request: GenRequest) -> None:
        """Queues a request; thread-safe.

        Raises:
            ValueError: On invalid parameters or a key already pending or active.
        """
        _validate(request)
        with self._lock:
            if request.key in self._active_keys or any(r.key == request.key for r in self._pending):
                raise ValueError(f"request key {request.key!r} is already queued or running")
            self._pending.append(request)

    def cancel(self, key: str) -> bool:
        """Drops a pending or active request; it gets no further events. Thread-safe.

        Returns:
            True if the key was pending or active.
        """
        with self._lock:
            kept = deque(r for r in self._pending if r.key != key)
            if len(kept) < len(self._pending):
                self._pending = kept
                return True
            if key in self._active_keys:
                self._cancelled.add(key)
                return True
            return False

    @property
    def idle(self) -> bool:
        """True when nothing is pending or active."""
        with self._lock:
            return not self._pending and not self._active_keys

    @property
    def active(self) -> int:
        """Requests being decoded."""
        return len(self._active_keys)  # len() is atomic under the GIL

    @property
    def pending(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._pending)

    @property
    def cache_len(self) -> int:
        """Sequence length (columns) of the shared KV cache; 0 when empty."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def step(self) -> list[GenEvent]:
        """Decodes one token for every active request, then admits and prefills pending ones.

        Returns:
            One event per request that produced a token; [] when idle.
        """
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            self._active_keys -= cancelled
        with torch.inference_mode():
            self._keep([i for i, s in enumerate(self._rows) if s.req.key not in cancelled])
            self._fills = [f for f in self._fills if f.seq.req.key not in cancelled]
            events: list[GenEvent] = []
            if self._rows:
                logits = self._decode()
                events += self._advance_all(self._rows, logits)
                self._keep([i for i, s in enumerate(self._rows) if s.finish_reason is None])
            for group, hit in self._groups(self._admit()):
                group = self._set_aside_long(group, hit)
                if group:
                    logits, cache, mask = self._prefill(group, hit)
                    self._joined(group, logits, cache, mask, events)
            self._fill_step(events)
            return events

    def _joined(
        self,
        seqs: list[_Seq],
        logits: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor,
        events: list[GenEvent],
    ) -> None:
        """Newcomers whose prompts are in: their first tokens, then into the running batch."""
        events += self._advance_all(seqs, logits)
        self._remember(seqs, cache, mask)
        self._merge(seqs, cache, mask)

    def _set_aside_long(self, group: list[_Seq], hit: Hit | None) -> list[_Seq]:
        """Moves the prompts longer than a chunk (after any cached beginning) to `_fills`;
        returns the rest, prefilled whole this step."""
        chunk = self.prefill_chunk_tokens
        done = 0 if hit is None else hit.tokens
        if chunk <= 0:
            return group
        short = []
        for seq in group:
            if len(seq.req.prompt_ids) - done > chunk:
                self._fills.append(_Fill(seq, self._start_cache(1, seq, hit), done))
            else:
                short.append(seq)
        return short

    def _fill_step(self, events: list[GenEvent]) -> None:
        """Prefills up to one chunk of the long prompts waiting, oldest first; one whose prompt
        is all in gets its first token and joins the running batch."""
        budget = self.prefill_chunk_tokens
        while self._fills and budget > 0:
            fill = self._fills[0]
            prompt = fill.seq.req.prompt_ids
            n = min(budget, len(prompt) - fill.done)
            ids = torch.tensor([prompt[fill.done : fill.done + n]], device=self.device)
            mask = torch.ones(1, fill.done + n, dtype=torch.long, device=self.device)
            positions = torch.arange(fill.done, fill.done + n, device=self.device)[None]
            extra: dict[str, Any] = {"logits_to_keep": 1} if self._keep_logits else {}
            logits = self._forward(
                fill.cache, input_ids=ids, attention_mask=mask, position_ids=positions, **extra
            )
            fill.done += n
            budget -= n
            if fill.done == len(prompt):
                self._fills.pop(0)
                self._joined([fill.seq], logits, fill.cache, mask, events)

    def _groups(self, seqs: list[_Seq]) -> list[tuple[list[_Seq], Hit | None]]:
        """Newcomers grouped by the cached prompt beginning they share (one prefill each)."""
        if not seqs:
            return []
        if self.prefixes is None:
            return [(seqs, None)]
        groups: dict[bytes | None, tuple[list[_Seq], Hit | None]] = {}
        for seq in seqs:
            hit = self.prefixes.lookup(seq.req.prompt_ids)
            key = None if hit is None else hit.key
            if key not in groups and hit is not None:
                # Taken now: storing an earlier group's blocks may evict these.
                layers = self.prefixes.keys_values(seq.req.prompt_ids, hit)
                hit = Hit(hit.tokens, hit.key, layers)
            groups.setdefault(key, ([], hit))[0].append(seq)
        return list(groups.values())

    def _remember(self, seqs: list[_Seq], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Keeps the newcomers' prompt blocks for later ones that begin the same way."""
        if self.prefixes is None:
            return
        layers = [(layer.keys, layer.values) for layer in _layers(cache)]
        if any(k is None or v is None for k, v in layers):
            return
        for row, seq in enumerate(seqs):
            columns = mask[row].nonzero().flatten()  # the prompt's tokens, in order
            self.prefixes.store(seq.req.prompt_ids, columns, row, layers)  # type: ignore[arg-type]

    def _slots_taken(self) -> int:
        return len(self._rows) + len(self._fills)

    def _admit(self) -> list[_Seq]:
        taken: list[GenRequest] = []
        width = 0
        with self._lock:
            while self._pending and self._slots_taken() + len(taken) < self.max_batch:
                # Prefill pads every newcomer to the longest, so that is what the budget counts.
                width = max(width, len(self._pending[0].prompt_ids))
                if taken and (len(taken) + 1) * width > self.max_batch_tokens:
                    break
                request = self._pending.popleft()
                taken.append(request)
                self._active_keys.add(request.key)
        seeds = [random.getrandbits(63) if r.seed is None else r.seed for r in taken]
        return [
            _Seq(r, torch.Generator(self.device).manual_seed(seed))
            for r, seed in zip(taken, seeds, strict=True)
        ]

    def _prefill(
        self, seqs: list[_Seq], hit: Hit | None = None
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward pass over the newcomers' prompts, after a cached beginning they share
        (`hit`): its keys and values start the cache, and only what follows is computed. Rows
        are [beginning][padding][rest of the prompt]: the mask says which columns are real."""
        done = 0 if hit is None else hit.tokens
        width = max(len(s.req.prompt_ids) - done for s in seqs)
        rows = [torch.tensor(s.req.prompt_ids[done:], dtype=torch.long) for s in seqs]
        ids = torch.stack([F.pad(r, (width - len(r), 0), value=self._pad_id) for r in rows])
        mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
        cache = self._start_cache(len(seqs), seqs[0], hit)
        if hit is not None:
            mask = torch.cat([torch.ones(len(seqs), done, dtype=mask.dtype), mask], dim=1)
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a padded row sees the same ones as unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, done:]
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._keep_logits else {}
        logits = self._forward(
            cache, input_ids=ids, attention_mask=mask, position_ids=positions, **extra
        )
        return logits, cache, mask

    def _start_cache(self, rows: int, seq: _Seq, hit: Hit | None) -> DynamicCache:
        """A cache for `rows` newcomers: empty, or holding the cached beginning they share."""
        cache = DynamicCache(config=self._model.config)
        if hit is None:
            return cache
        for layer, (keys, values) in zip(_layers(cache), hit.layers, strict=True):
            layer.update(
                keys.expand(rows, -1, -1, -1).to(self.device).contiguous(),
                values.expand(rows, -1, -1, -1).to(self.device).contiguous(),
            )
        return cache

    def _decode(self) -> torch.Tensor:
        assert self._mask is not None and self._cache is not None
        last = torch.tensor([[s.ids[-1]] for s in self._rows], dtype=torch.long, device=self.device)
        mask = F.pad(self._mask, (0, 1), value=1)
        positions = mask.sum(-1, keepdim=True) - 1
        logits = self._forward(
            self._cache, input_ids=last, attention_mask=mask, position_ids=positions
        )
        self._mask = mask
        return logits

    def _forward(self, cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        out = self._model(**inputs, past_key_values=cache, use_cache=True)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _merge(self, seqs: list[_Seq], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None:
            self._cache, self._mask, self._rows = cache, mask, seqs
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
                _stack_layer(old, new, width)
            self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
            self._rows = self._rows + seqs
        # Newcomers that finished on their first token leave again at once.
        self._keep([i for i, s in enumerate(self._rows) if s.finish_reason is None])

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._rows):
            return
        if not rows:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[i] for i in rows]
        self._trim()

    def _trim(self) -> None:
        # Drops the columns that every row pads.
        assert self._cache is not None and self._mask is not None
        real = self._mask.any(0)
        if bool(real.all()):
            return
        lead = int(real.int().argmax())
        if bool(real[lead:].all()):  # padding only in front: a view, no copy
            for layer in _layers(self._cache):
                assert layer.keys is not None and layer.values is not None
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
            self._mask = self._mask[:, lead:]
            return
        # Padding in the middle too (a cached beginning's rows, once their longer partners
        # left): gathered away, since positions come from the mask's sums, not its columns.
        keep = real.nonzero().flatten()
        for layer in _layers(self._cache):
            assert layer.keys is not None and layer.values is not None
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)
        self._mask = self._mask.index_select(1, keep)

    def _advance_all(self, seqs: list[_Seq], logits: torch.Tensor) -> list[GenEvent]:
        logits = logits.float()
        greedy: list[int] = logits.argmax(-1).tolist()
        events = [
            self._advance(seq, _sample(logits[row], seq) if seq.req.temperature > 0 else token)
            for row, (seq, token) in enumerate(zip(seqs, greedy, strict=True))
        ]
        done = {s.req.key for s in seqs if s.finish_reason is not None}
        if done:
            with self._lock:
                self._active_keys -= done
                self._cancelled -= done  # so a later request reusing the key is not hit
            log.debug("finished %d request(s)", len(done))
        return events

    def _advance(self, seq: _Seq, token: int) -> GenEvent:
        seq.ids.append(token)
        if seq.first_token_s is None:
            seq.first_token_s = time.monotonic()
        reason = "eos" if token in self._eos and not seq.req.ignore_eos else None
        if reason is None and len(seq.ids) >= seq.req.max_new_tokens:
            reason = "length"
        text = str(self._tokenizer.decode(seq.ids, skip_special_tokens=True))
        delta, seq.finish_reason = _delta(text, seq.text_sent, seq.req.stop, reason)
        seq.text_sent += delta
        return GenEvent(
            key=seq.req.key,
            text=delta,
            token_ids=[token],
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            generated=len(seq.ids),
            prompt_tokens=len(seq.req.prompt_ids),
            first_token_s=seq.first_token_s,
        )


def _validate(request: GenRequest) -> None:
    problems = {
        "prompt_ids must not be empty": not request.prompt_ids,
        "max_new_tokens must be >= 1": request.max_new_tokens < 1,
        "temperature must be >= 0": request.temperature < 0,
        "top_p must be in (0, 1]": not 0 < request.top_p <= 1,
        "stop strings must not be empty": any(not s for s in request.stop),
    }
    if any(problems.values()):
        raise ValueError("; ".join(text for text, bad in problems.items() if bad))


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    found = [getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id]
    flat = [i for ids in found for i in (ids if isinstance(ids, list) else [ids])]
    return {int(i) for i in flat if i is not None}


def _check_cache(model: PreTrainedModel) -> None:
    # Merging and trimming edit keys/values along the sequence dim, which is only right for
    # full-attention layers; sliding-window, linear-attention or quantised layers would break.
    layers = DynamicCache(config=model.config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise NotImplementedError(f"continuous batching needs full-attention layers, got {odd}")


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    return [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]


def _stack_layer(old: DynamicLayer, new: DynamicLayer, width: int) -> None:
    assert old.keys is not None and old.values is not None
    assert new.keys is not None and new.values is not None
    old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)])
    old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)])


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = width - shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim) if shape[dim] else tensor


def _sample(logits: torch.Tensor, seq: _Seq) -> int:
    request, generator = seq.req, seq.generator
    probs = torch.softmax(logits / request.temperature, dim=-1)
    if request.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= request.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _delta(text: str, sent: str, stops: tuple[str, ...], why: str | None) -> tuple[str, str | None]:
    cut = _find_stop(text, stops, len(sent))
    if cut is not None:
        why, end = "stop", cut
    elif why is not None:
        end = len(text)
    elif text.startswith(sent):
        end = _safe_end(text, stops)
    else:
        end = len(sent)  # the tokenizer rewrote text already sent, which cannot be taken back
    return text[len(sent) : end] if end > len(sent) else "", why


def _find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    if not stops:
        return None
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return max(min(hits), sent) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    # Hold back a trailing partial UTF-8 char and any tail that could begin a stop string.
    end = len(text.rstrip("\ufffd"))
    safe = end
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:size], 0, end):
                safe = min(safe, end - size)
                break
    return safe
