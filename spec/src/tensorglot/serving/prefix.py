"""Prefix caching and chunked prefill for the server's engine.

**`PrefixCache`.** A prompt's full blocks of ``block_size`` tokens are keyed by a hash chained over the
tokens (block i's key is BLAKE2b of block i − 1's key and block i's ids, so a key names the whole prefix
up to its block, as vLLM keys them). After each prefill the engine stores the blocks it has not seen; a
later prompt that starts with the same tokens `match`es the longest chain of stored blocks and prefills
only the rest. A block is pinned (``refs``) from `match` until its prefill ends — a chunked prefill spans
several engine loops, during which other prefills store blocks and may evict — and the least recently
used unpinned blocks are evicted past ``capacity`` blocks. The store is host memory (NumPy keys after
RoPE and values): it saves prefill compute, not decode-pool memory, which keeps its own copy per row.
At least the prompt's last token is always computed: its logits choose the first token.

**`PromptPrefill`.** One prompt's prefill in steps through a contiguous cache of one sequence, as
`tensorglot.serving.engine.prefill` runs it whole: seeded with the matched blocks (written through the
cache's own ``reserve``/``update``/``advance``), then `run` a chunk of ``n`` tokens at a time (positions
continue from what the cache holds), then `finish` reads every layer's KV back. Chunks let the engine
interleave a long prompt with decode steps (Sarathi-Serve's chunked prefill, arXiv:2403.02310).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..params import TransformerConfig
from .engine import Prefilled, read_kv


def block_keys(tokens: np.ndarray, block_size: int) -> list[bytes]:
    """The chained key of each full block of ``tokens``."""
    keys, key = [], b""
    ids = np.asarray(tokens, dtype=np.int64)
    for i in range(len(ids) // block_size):
        key = hashlib.blake2b(key + ids[i * block_size : (i + 1) * block_size].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


@dataclass(eq=False)
class Block:
    k: list[np.ndarray]  # per layer (block_size, K, H); empty in the router's mirror of a cache
    v: list[np.ndarray]
    refs: int = 0
    origin: int = -1  # which computation produced these bits (the router's mirror: the request id)


class PrefixCache:
    def __init__(self, block_size: int, capacity: int) -> None:
        if block_size < 1 or capacity < 1:
            raise ValueError(f"PrefixCache: block_size and capacity must be >= 1, got {block_size}, {capacity}")
        self.block_size, self.capacity = block_size, capacity
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.stats = {"matched_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

    def peek(self, prompt: np.ndarray) -> list[Block]:
        """The stored blocks that begin ``prompt`` (never its last token), touching nothing."""
        found = []
        for key in block_keys(prompt[:-1], self.block_size):
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def match(self, prompt: np.ndarray) -> list[Block]:
        """`peek`'s blocks, made most recently used and pinned: `unpin` them after use."""
        found = self.peek(prompt)
        for key in block_keys(prompt[:-1], self.block_size)[: len(found)]:
            self.blocks.move_to_end(key)
        for block in found:
            block.refs += 1
        self.stats["matched_tokens"] += len(found) * self.block_size
        return found

    def unpin(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.refs -= 1
        self._evict()

    def store(
        self, prompt: np.ndarray, k: list[np.ndarray] | None, v: list[np.ndarray] | None,
        origins: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        """Keep the full blocks of a prefilled ``prompt`` (``k``, ``v`` per layer (P, K, H); None in a
        mirror, which keeps keys only) not yet stored; block i records ``origins[i]``."""
        bs = self.block_size
        for i, key in enumerate(block_keys(prompt, bs)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            part = slice(i * bs, (i + 1) * bs)
            origin = -1 if origins is None else origins[i]
            self.blocks[key] = Block([a[part].copy() for a in k or []], [a[part].copy() for a in v or []], 0, origin)
            self.stats["stored_blocks"] += 1
        self._evict()

    def _evict(self) -> None:
        excess = len(self.blocks) - self.capacity
        for key in [key for key, block in self.blocks.items() if block.refs == 0][: max(0, excess)]:
            del self.blocks[key]
            self.stats["evicted_blocks"] += 1


class PromptPrefill:
    """One prompt's prefill: seeded with cached blocks, run in chunks, then read back (see the module)."""

    def __init__(
        self, be: Any, params: Any, config: TransformerConfig, prompt: np.ndarray, cached: Sequence[Block] = ()
    ) -> None:
        self.be, self.params, self.config = be, params, config
        self.prompt = np.asarray(prompt, dtype=np.int64)
        self.seconds, start = 0.0, time.perf_counter()
        dtype = be.dtype_name(params["embed"])
        self.cache = be.layers.kv_cache(config, 1, len(self.prompt) + 1, kind="contiguous", dtype=dtype)
        self.done = sum(b.k[0].shape[0] for b in cached)
        if cached:
            self.cache.reserve(self.done)
            for layer in range(config.n_layers):
                k = np.concatenate([b.k[layer] for b in cached])[None]  # (1, C, K, H)
                v = np.concatenate([b.v[layer] for b in cached])[None]
                self.cache.update(layer, be.asarray(k, dtype=dtype), be.asarray(v, dtype=dtype))
            self.cache.advance(self.done)
        self.cached = self.done
        self.logits: np.ndarray | None = None
        self.seconds += time.perf_counter() - start

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

    def run(self, n: int | None = None) -> bool:
        """Compute the next ``n`` prompt tokens (None: all that remain); True when the prompt is done."""
        start = time.perf_counter()
        n = self.remaining if n is None else min(n, self.remaining)
        tokens = self.be.asarray(self.prompt[None, self.done : self.done + n], dtype="int64")  # (1, n)
        logits = self.be.layers.transformer(tokens, self.params, self.config, cache=self.cache)
        self.done += n
        if self.remaining == 0:
            self.logits = self.be.to_numpy(logits)[0, -1].astype(np.float64)
        self.seconds += time.perf_counter() - start
        return self.remaining == 0

    def finish(self) -> Prefilled:
        if self.logits is None:
            raise RuntimeError(f"PromptPrefill.finish: {self.remaining} prompt tokens are not computed yet")
        k, v = read_kv(self.be, self.cache, self.config, len(self.prompt))
        return Prefilled(int(np.argmax(self.logits)), k, v, self.seconds, self.logits)
