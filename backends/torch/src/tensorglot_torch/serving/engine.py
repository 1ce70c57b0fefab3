"""The model side of serving, written against the spec's public API of whichever backend is passed:
`prefill` (a prompt → its first token and its KV) and `DecodeEngine` (continuous batching over a
`PagedKVPool`). No transport here: `workers` moves what these produce."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorglot.params import TransformerConfig

from .paged import PagedKVPool


class _Recorder:
    """A `tensorglot.cache.KVCache` that forwards to ``inner`` and keeps what each layer wrote."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.kind, self.batch, self.max_len = inner.kind, inner.batch, inner.max_len
        self.n_layers, self.n_kv_heads, self.head_dim = inner.n_layers, inner.n_kv_heads, inner.head_dim
        self.k: list[Any] = [None] * inner.n_layers
        self.v: list[Any] = [None] * inner.n_layers

    def lengths(self) -> np.ndarray:
        return self.inner.lengths()

    def reserve(self, n: int, /) -> None:
        self.inner.reserve(n)

    def update(self, layer: int, k: Any, v: Any, /) -> tuple[Any, Any]:
        self.k[layer], self.v[layer] = k, v  # (1, P, K, H), keys after RoPE
        return self.inner.update(layer, k, v)

    def advance(self, n: int, /) -> None:
        self.inner.advance(n)

    def free(self, seq: int, /) -> None:
        self.inner.free(seq)

    def reset(self) -> None:
        self.inner.reset()


@dataclass
class Prefilled:
    first_token: int
    k: list[np.ndarray]  # per layer (P, K, H)
    v: list[np.ndarray]
    seconds: float

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def prefill(be: Any, params: Any, config: TransformerConfig, prompt: np.ndarray) -> Prefilled:
    """Run ``prompt`` (P,) as `generate` does its first step (a contiguous cache of one sequence):
    the greedy first token and every layer's keys (after RoPE) and values."""
    start = time.perf_counter()
    P = int(prompt.shape[0])
    dtype = be.dtype_name(params["embed"])
    cache = _Recorder(be.layers.kv_cache(config, 1, P, kind="contiguous", dtype=dtype))
    tokens = be.asarray(np.asarray(prompt, dtype=np.int64)[None], dtype="int64")  # (1, P)
    logits = be.layers.transformer(tokens, params, config, cache=cache)
    first = int(np.argmax(be.to_numpy(logits)[0, -1]))
    k = [np.ascontiguousarray(be.to_numpy(x)[0]) for x in cache.k]  # (P, K, H)
    v = [np.ascontiguousarray(be.to_numpy(x)[0]) for x in cache.v]
    return Prefilled(first, k, v, time.perf_counter() - start)


@dataclass
class Sequence:
    rid: int
    max_new: int
    tokens: list[int]  # generated so far, the prefill's first token included
    t_first: float  # wall clock (time.time) when the first token was available on the decode side
    info: dict[str, Any] = field(default_factory=dict)
    t_last: float = 0.0


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
        dtype = be.dtype_name(params["embed"])
        if num_blocks is None:
            num_blocks = max_batch * -(-config.max_seq_len // block_size)
        self.pool = PagedKVPool(be, config, num_blocks=num_blocks, block_size=block_size, dtype=dtype)
        self.active: dict[int, Sequence] = {}
        self.steps = 0
        self.step_seconds: list[float] = []

    def warm_up(self) -> None:
        """One prefill and one decode step of a throwaway request, so first-call costs are not timed."""
        pre = prefill(self.be, self.params, self.config, np.zeros(2, dtype=np.int64))
        self.admit(Sequence(-1, 2, [pre.first_token], 0.0), pre.k, pre.v)
        self.step()
        self.steps, self.step_seconds = 0, []

    def can_admit(self, prompt_len: int, max_new: int) -> bool:
        # Reserve a request's whole budget on admission so a step never runs out of blocks.
        committed = sum(
            self.pool.blocks_for(len(s.tokens) - 1 + s.max_new) - len(self.pool.tables[s.rid])
            for s in self.active.values()
        )
        need = self.pool.blocks_for(prompt_len + max_new - 1)
        return len(self.active) < self.max_batch and need + committed <= self.pool.free_blocks()

    def admit(self, seq: Sequence, k: list[np.ndarray], v: list[np.ndarray]) -> list[Sequence]:
        """Add a prefilled sequence; returns it at once when it is already done (max_new == 1)."""
        if seq.max_new <= len(seq.tokens):
            seq.t_last = seq.t_first
            return [seq]
        self.pool.insert(seq.rid, k, v)
        self.active[seq.rid] = seq
        return []

    def step(self) -> list[Sequence]:
        """One decode step over every active sequence; returns the ones that finished."""
        start = time.perf_counter()
        rids = list(self.active)
        last = np.array([[self.active[r].tokens[-1]] for r in rids], dtype=np.int64)  # (B, 1)
        view = self.pool.view(rids)
        logits = self.be.layers.transformer(self.be.asarray(last, dtype="int64"), self.params, self.config, cache=view)
        nxt = np.argmax(self.be.to_numpy(logits)[:, -1], axis=-1)  # (B,), the first maximum on ties
        now, done = time.time(), []
        for r, t in zip(rids, nxt.tolist()):
            seq = self.active[r]
            seq.tokens.append(int(t))
            if len(seq.tokens) >= seq.max_new:
                seq.t_last = now
                done.append(self.active.pop(r))
                self.pool.free(r)
        self.steps += 1
        self.step_seconds.append(time.perf_counter() - start)
        return done
