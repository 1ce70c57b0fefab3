"""The model side of serving, through any backend's public layers API: `prefill` (a prompt → its first
token and its KV) and `DecodeEngine` (continuous batching over a `PagedKVPool`). No transport here:
`tensorglot.serving.workers` moves what these produce."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..params import TransformerConfig
from .pool import PagedKVPool


@dataclass
class Prefilled:
    first_token: int
    k: list[np.ndarray]  # per layer (P, K, H), keys after RoPE
    v: list[np.ndarray]
    seconds: float
    logits: np.ndarray | None = None  # (V,) float64, the prompt's last logits (the server samples them)

    @property
    def arrays(self) -> list[np.ndarray]:
        """k_0, v_0, k_1, v_1, ...: the order they travel in."""
        return [a for kv in zip(self.k, self.v) for a in kv]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def prefill(be: Any, params: Any, config: TransformerConfig, prompt: np.ndarray) -> Prefilled:
    """Run ``prompt`` (P,) as `generate` runs its first step (a contiguous cache of one sequence): the
    greedy first token and every layer's keys (after RoPE) and values, read back through the cache
    protocol (one more reserved token, whose ``update`` returns what each layer holds; never advanced)."""
    start = time.perf_counter()
    P = int(prompt.shape[0])
    dtype = be.dtype_name(params["embed"])
    cache = be.layers.kv_cache(config, 1, P + 1, kind="contiguous", dtype=dtype)
    tokens = be.asarray(np.asarray(prompt, dtype=np.int64)[None], dtype="int64")  # (1, P)
    last = be.to_numpy(be.layers.transformer(tokens, params, config, cache=cache))[0, -1].astype(np.float64)
    k, v = read_kv(be, cache, config, P)
    return Prefilled(int(np.argmax(last)), k, v, time.perf_counter() - start, last)


def read_kv(be: Any, cache: Any, config: TransformerConfig, P: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first ``P`` keys and values of every layer of a one-sequence ``cache`` with room for one more
    token, as NumPy (P, K, H): that token is reserved, and its ``update`` returns what each layer holds."""
    cache.reserve(1)
    zeros = be.asarray(np.zeros((1, 1, config.n_kv_heads, config.head_dim)), dtype=cache.dtype)  # (1, 1, K, H)
    k, v = [], []
    for layer in range(config.n_layers):
        k_all, v_all = cache.update(layer, zeros, zeros)  # (1, T, K, H), T > P
        k.append(np.ascontiguousarray(be.to_numpy(k_all)[0, :P]))  # (P, K, H)
        v.append(np.ascontiguousarray(be.to_numpy(v_all)[0, :P]))
    return k, v


@dataclass
class Sequence:
    rid: int
    prompt_len: int
    max_new: int
    tokens: list[int]  # generated so far, the prefill's first token included
    t_first: float  # wall clock (time.time) when the first token was available on the decode side
    info: dict[str, Any] = field(default_factory=dict)
    t_last: float = 0.0
    times: list[float] = field(default_factory=list)  # each token's wall clock, t_first first (from `admit`)


class DecodeEngine:
    """Continuous batching: every `step` feeds each active sequence its last token; sequences join
    with `admit` and leave when they have ``max_new`` tokens, freeing their blocks."""

    def __init__(
        self,
        be: Any,
        params: Any,
        config: TransformerConfig,
        *,
        max_batch: int = 16,
        block_size: int = 16,
        num_blocks: int | None = None,
    ) -> None:
        self.be, self.params, self.config, self.max_batch = be, params, config, max_batch
        if num_blocks is None:
            num_blocks = max_batch * -(-config.max_seq_len // block_size)
        dtype = be.dtype_name(params["embed"])
        self.pool = PagedKVPool(
            be, config, max_batch=max_batch, block_size=block_size, num_blocks=num_blocks, dtype=dtype
        )
        self.active: dict[int, Sequence] = {}
        self.steps = 0
        self.step_seconds: list[float] = []

    def warm_up(self) -> None:
        """One prefill and one decode step of a throwaway request, so first-call costs are not timed."""
        pre = prefill(self.be, self.params, self.config, np.zeros(2, dtype=np.int64))
        self.admit(Sequence(-1, 2, 2, [pre.first_token], 0.0), pre.k, pre.v)
        self.step()
        self.steps, self.step_seconds = 0, []

    def _final_blocks(self, seq: Sequence) -> int:
        # The last token is never fed back, so a sequence ends holding prompt + max_new − 1 tokens.
        return self.pool.blocks_for(seq.prompt_len + seq.max_new - 1)

    def can_admit(self, prompt_len: int, max_new: int) -> bool:
        # Reserve a request's whole budget on admission so a step never runs out of blocks.
        committed = sum(self._final_blocks(s) - len(self.pool.table(s.rid)) for s in self.active.values())
        need = self.pool.blocks_for(prompt_len + max_new - 1)
        return len(self.active) < self.max_batch and need + committed <= self.pool.free_blocks()

    def admit(self, seq: Sequence, k: list[np.ndarray], v: list[np.ndarray]) -> list[Sequence]:
        """Add a prefilled sequence; returns it at once when it is already done (max_new == 1)."""
        seq.times = [seq.t_first]
        if seq.max_new <= len(seq.tokens):
            seq.t_last = seq.t_first
            return [seq]
        self.pool.write({seq.rid: (k, v)})
        self.active[seq.rid] = seq
        return []

    def forward(self) -> tuple[dict[int, int], np.ndarray]:
        """One decode step's model call over every row (idle rows feed token 0): the active rows
        ``{rid: row}`` and every row's last logits (B, V) on the host."""
        rows = {rid: self.pool.rows[rid] for rid in self.active}
        last = np.zeros((self.max_batch, 1), dtype=np.int64)  # (B, 1)
        for rid, row in rows.items():
            last[row, 0] = self.active[rid].tokens[-1]
        tokens = self.be.asarray(last, dtype="int64")
        logits = self.be.layers.transformer(tokens, self.params, self.config, cache=self.pool.cache)
        return rows, self.be.to_numpy(logits)[:, -1]

    def step(self) -> list[Sequence]:
        """One greedy decode step over every row (idle rows are ignored); returns the finished."""
        start = time.perf_counter()
        rows, logits = self.forward()
        nxt = np.argmax(logits, axis=-1)  # (B,), the first maximum on ties
        now, done = time.time(), []
        for rid, row in rows.items():
            seq = self.active[rid]
            seq.tokens.append(int(nxt[row]))
            seq.times.append(now)
            if len(seq.tokens) >= seq.max_new:
                seq.t_last = now
                done.append(self.active.pop(rid))
                self.pool.release(rid)
        self.steps += 1
        self.step_seconds.append(time.perf_counter() - start)
        return done
