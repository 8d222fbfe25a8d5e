"""Prefix caching for the continuous batcher: the keys and values of prompt beginnings that
many requests share (a system prompt, a document everyone asks about) are kept, so a newcomer
prefills only what follows them.

As vLLM's automatic prefix caching does, prompts are cut into blocks of `BLOCK` tokens and each
full block is keyed by a hash chained over every token up to its end, so a block is found only
behind the very same beginning. A block holds its tokens' keys and values of every layer, as
computed in the prompt that first had it (after rotary embedding: a block is reused only at the
positions it was made at, which the chain guarantees). Lookups walk the chain from the start;
blocks are evicted least recently used, whole, within `capacity_tokens`.

Reuse is exact up to rounding: a block made in one batch and read in another can differ in the
last bits (a matmul's sum order depends on the batch's shape), as any two batches' prefills do.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per block: the granularity of what can be shared
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer
Block = tuple[bytes, tuple[int, ...], KeysValues]  # parent's key, its tokens, keys and values
# Chain keys are keyed digests: a prompt cannot be crafted to collide with another's
# beginning (Python's tuple hash is not randomised for ints, and can be), so one tenant's
# prompt never reads keys and values made from another's.
_SALT = os.urandom(16)


@dataclass(frozen=True, slots=True)
class Hit:
    """A cached beginning of one prompt: its length, the chain key of its last block, and
    (once taken, before anything else is stored and could evict its blocks) its keys and
    values."""

    tokens: int
    key: bytes
    layers: KeysValues = field(default_factory=list, compare=False)


class PrefixCache:
    """Blocks of keys and values, found by the chain hash of the tokens up to each block's end.

    Owned by the model thread: no locking.
    """

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = capacity_tokens // BLOCK
        # chain hash -> the block's tokens (checked on lookup: a hash is not proof) and per
        # layer (keys, values), each [kv heads, BLOCK, head dim]
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.hits = 0  # prompt tokens that were not prefilled again
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def chain(prompt: Sequence[int], blocks: int) -> list[bytes]:
        """The chain keys of the prompt's first `blocks` full blocks."""
        keys, parent = [], b""
        for b in range(blocks):
            tokens = array("q", prompt[b * BLOCK : (b + 1) * BLOCK]).tobytes()
            parent = hashlib.blake2b(parent + tokens, digest_size=16, key=_SALT).digest()
            keys.append(parent)
        return keys

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The longest cached beginning of `prompt`, leaving at least one token to prefill
        (its logits give the first new token)."""
        self.lookups += 1
        found: list[bytes] = []
        for b, key in enumerate(self.chain(prompt, (len(prompt) - 1) // BLOCK)):
            block = self._blocks.get(key)
            parent = found[-1] if found else b""
            tokens = tuple(prompt[b * BLOCK : (b + 1) * BLOCK])
            if block is None or block[0] != parent or block[1] != tokens:
                break
            found.append(key)
        if not found:
            return None
        self._touch(found)
        self.hits += len(found) * BLOCK
        return Hit(len(found) * BLOCK, found[-1])

    def _touch(self, chain: list[bytes]) -> None:
        # Last block first, so a chain's first blocks are the most recently used and the
        # least-recently-used end evicts chains from their tails: an evicted first block
        # would strand every block behind it.
        for key in reversed(chain):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def keys_values(self, prompt: Sequence[int], hit: Hit) -> KeysValues:
        """Per layer, the keys and values of the hit's tokens: [1, kv heads, tokens, dim]."""
        blocks = [self._blocks[key][2] for key in self.chain(prompt, hit.tokens // BLOCK)]
        layers = len(blocks[0])
        return [
            (
                torch.cat([block[i][0] for block in blocks], dim=1)[None],
                torch.cat([block[i][1] for block in blocks], dim=1)[None],
            )
            for i in range(layers)
        ]

    def store(
        self,
        prompt: Sequence[int],
        columns: torch.Tensor,
        row: int,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> int:
        """Keeps the full blocks of one prefilled prompt that are not kept yet.

        `columns`: the cache columns of the prompt's tokens in order (its row has padding
        too); `layers`: the prefill's per-layer keys and values, [rows, kv heads, cols, dim].
        Returns how many blocks it added."""
        if self.capacity_blocks == 0:
            return 0
        added = 0
        # Every full block (a later prompt that extends this one can use them all), but not
        # more than the cache holds: a long unique prompt must not flush it whole.
        chain = self.chain(prompt, min(len(prompt) // BLOCK, self.capacity_blocks))
        for b, key in enumerate(chain):
            if key in self._blocks:
                continue
            cols = columns[b * BLOCK : (b + 1) * BLOCK]
            tokens = tuple(prompt[b * BLOCK : (b + 1) * BLOCK])
            # Indexing with a tensor copies: no view keeps the whole batch's cache alive.
            kv = [(k[row, :, cols], v[row, :, cols]) for k, v in layers]
            self._blocks[key] = (chain[b - 1] if b else b"", tokens, kv)
            added += 1
        self._touch(chain)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
        return added
