"""Prefix caching: the keys and values of prompt beginnings that earlier requests computed, reused.

A chat server sees the same beginnings again and again: the system prompt opens every request, and in a
conversation each turn's prompt is the previous turn's prompt plus a reply and a message. vLLM (automatic
prefix caching) and llama.cpp's server (`cache_prompt`) skip recomputing them; so does the engine with a
`PrefixCache`.

A token sequence is cut into blocks of `BLOCK` tokens. A block is filed under a hash of its tokens and
of the key of the block before it, so the same 16 tokens after different beginnings are different blocks;
each entry also keeps its tokens and its parent's key, and a lookup checks both, so a hash collision can
cost a miss but never hand over another prompt's keys. An entry holds the block's keys and values of
every layer, copied out of the running cache: a finished request's row is reused at once, its blocks stay.

A new sequence copies the longest run of filed blocks at the start of its prompt into its cache row and
prefills only the rest, at least its last token (sampling needs that position's logits). Blocks are filed
when a prefill has written them and when a sequence ends (its reply too: the next turn of the conversation
starts with it). Beyond a budget of bytes, the least recently used blocks go.

The reused keys were computed in other batches and chunks than a fresh prefill would use: logits agree to
float rounding (~1e-6), not bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .model import KVCache

BLOCK = 16  # tokens per block (vLLM's default)


@dataclass
class Block:
    parent: int | None  # the key of the block before it (None: the first block)
    tokens: tuple[int, ...]
    k: torch.Tensor  # (n_layer, kv_heads, BLOCK, head_dim)
    v: torch.Tensor


def block_keys(tokens: list[int], known: list[int]) -> list[int]:
    """The keys of every full block of `tokens`, extending `known` (the keys of its first blocks)."""
    keys = list(known)
    for i in range(len(keys), len(tokens) // BLOCK):
        keys.append(hash((keys[-1] if keys else None, tuple(tokens[i * BLOCK:(i + 1) * BLOCK]))))
    return keys


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens that came from the cache
        self.lookup_tokens = 0  # prompt tokens looked up

    def match(self, tokens: list[int], keys: list[int]) -> int:
        """How many of the first blocks of `tokens` (whose keys are `keys`) are filed, in a run from the start."""
        n, parent = 0, None
        for i, key in enumerate(keys):
            block = self.blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tuple(tokens[i * BLOCK:(i + 1) * BLOCK]):
                break
            n, parent = n + 1, key
        return n

    def restore(self, cache: KVCache, row: int, tokens: list[int], keys: list[int]) -> int:
        """Copy the longest filed run of `tokens`' first blocks into `row` of the cache, leaving at least one
        token to prefill; returns how many tokens it copied (a multiple of BLOCK)."""
        self.lookup_tokens += len(tokens)
        n = min(self.match(tokens, keys), (len(tokens) - 1) // BLOCK)
        if n == 0:
            return 0
        blocks = []
        for key in keys[:n]:
            self.blocks.move_to_end(key)  # used: the last to go
            blocks.append(self.blocks[key])
        k, v = torch.cat([b.k for b in blocks], dim=2), torch.cat([b.v for b in blocks], dim=2)
        cache.reserve(cache.rows, n * BLOCK)
        for layer in range(len(cache.k)):
            cache.k[layer][row, :, :n * BLOCK] = k[layer]
            cache.v[layer][row, :, :n * BLOCK] = v[layer]
        self.hit_tokens += n * BLOCK
        return n * BLOCK

    def store(self, cache: KVCache, row: int, tokens: list[int], keys: list[int]) -> None:
        """File every full block of `tokens` (the first len(tokens) positions of `row`) not filed yet."""
        parent = None
        for i, key in enumerate(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                span = slice(i * BLOCK, (i + 1) * BLOCK)
                block = Block(parent, tuple(tokens[span]), torch.stack([t[row, :, span] for t in cache.k]),
                              torch.stack([t[row, :, span] for t in cache.v]))
                self.blocks[key] = block
                self.bytes += 2 * block.k.numel() * block.k.element_size()
            parent = key
        while self.bytes > self.budget and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= 2 * old.k.numel() * old.k.element_size()
