"""The decode side's paged KV pool: one backend paged cache whose rows are request slots.

`PagedKVPool` asks the serving backend for one paged cache (``be.layers.kv_cache(config, max_batch,
max_seq_len, kind="paged", ...)``) and swaps its bookkeeping for a `RowSlotMap`, the spec's
`tensorglot.cache.PagedSlotMap` with two additions that continuous batching needs and the plain cache
protocol (one ``reserve(n)`` and ``advance(n)`` for every sequence) cannot say:

* **Idle rows.** A row that holds no request keeps no block; in a decode step it writes to a scratch
  block that is never handed out, and its length stays 0. Every step runs the whole batch of
  ``max_batch`` rows, so the cache's shapes never change (JAX compiles the step once); an idle row's
  logits are discarded.
* **Staged writes.** `write` puts received prompt keys and values into chosen rows only: it stages
  their lengths, takes their blocks with the cache's public ``reserve``, writes just the prompts' rows
  at their slots (the cache's ``write_slots``: ``update``'s checks and kernel, without its read of every
  row), and ``advance`` sets the staged rows' lengths.

So the storage stays the backend's own (NumPy arrays, torch tensors, JAX's immutable arrays behind its
handle) and the model runs ``be.layers.transformer(tokens, params, config, cache=pool.cache)``.
Blocks are handed out lowest first, as `PagedSlotMap` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cache import PagedSlotMap
from ..params import TransformerConfig


class RowSlotMap(PagedSlotMap):
    """`PagedSlotMap` over ``num_blocks`` usable blocks plus one scratch block (the last slot range)."""

    def __init__(self, batch: int, max_len: int, block_size: int, num_blocks: int) -> None:
        super().__init__(batch, max_len, block_size, num_blocks + 1)
        self.scratch = num_blocks
        self._free.remove(self.scratch)
        self.active = np.zeros(self.batch, dtype=bool)
        self.staged: dict[int, int] | None = None  # row → prompt length, for one write round

    def _slot(self, seq: int, pos: np.ndarray) -> np.ndarray:
        return super()._slot(seq, pos) if self.tables[seq] else self._slot_idle(pos)

    def reserve(self, n: int, /) -> None:
        if self.staged is None:  # a decode step: active rows grow, idle rows take nothing
            n = self._check_room(n)
            need = {b: -(-(int(self._lengths[b]) + n) // self.block_size) - len(self.tables[b]) for b in self._rows()}
        else:  # a write round: the staged rows get the blocks of their prompts
            need = {row: -(-length // self.block_size) for row, length in self.staged.items()}
        if sum(need.values()) > len(self._free):
            raise ValueError(
                f"kv_cache.reserve: {sum(need.values())} new blocks of {self.block_size} needed but only "
                f"{len(self._free)} of {self.num_blocks - 1} are free (the cache is unchanged)"
            )
        self._free.sort()
        for row, k in need.items():
            self.tables[row].extend(self._free[:k])
            del self._free[:k]
        self.pending = int(n)

    def _rows(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(self.active)]

    def slots(self) -> np.ndarray:
        if self.staged is None:
            return super().slots()
        pos = np.arange(self.pending)
        out = np.stack([self._slot(b, pos) if b in self.staged else self._slot_idle(pos) for b in range(self.batch)])
        for row, length in self.staged.items():
            out[row, length:] = self._slot_idle(pos[length:])  # padding past the prompt
        return out  # (B, n)

    def _slot_idle(self, pos: np.ndarray) -> np.ndarray:
        return self.scratch * self.block_size + pos % self.block_size

    def advance(self, n: int, /) -> None:
        if n != self.pending:
            raise ValueError(f"kv_cache.advance: {n} tokens advanced but {self.pending} were reserved")
        if self.staged is None:
            self._lengths[self.active] += n
        else:
            for row, length in self.staged.items():
                self._lengths[row] = length
                self.active[row] = True
            self.staged = None
        self.pending = 0

    def free(self, seq: int, /) -> None:
        super().free(seq)
        self.active[seq] = False


class PagedKVPool:
    """Requests come and go between decode steps: `write` admits them into free rows, `release` frees."""

    def __init__(
        self, be: Any, config: TransformerConfig, *, max_batch: int, block_size: int, num_blocks: int, dtype: str
    ) -> None:
        self.be, self.config, self.dtype = be, config, dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        L = config.max_seq_len
        self.cache = be.layers.kv_cache(
            config, max_batch, L, kind="paged", block_size=block_size, num_blocks=num_blocks + 1, dtype=dtype
        )
        self.map = RowSlotMap(max_batch, L, block_size, num_blocks)
        if (
            not isinstance(getattr(self.cache, "map", None), PagedSlotMap)
            or self.cache.map.num_slots != self.map.num_slots
        ):
            raise TypeError(
                f"PagedKVPool: backend {be.name!r}'s paged cache must keep its bookkeeping in a "
                f"tensorglot.cache.PagedSlotMap of {self.map.num_slots} slots (its `map`)"
            )
        self.cache.map = self.map
        self.rows: dict[int, int] = {}  # request id → row

    def free_blocks(self) -> int:
        return self.map.free_blocks()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def free_rows(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.map.active)]

    def table(self, rid: int) -> list[int]:
        return self.map.block_table(self.rows[rid])

    def write(self, prompts: dict[int, tuple[list[np.ndarray], list[np.ndarray]]]) -> None:
        """Admit requests ``{rid: (k, v)}``, each per layer (P, K, H), into free rows in one round."""
        rows = self.free_rows()
        if len(prompts) > len(rows):
            raise ValueError(f"PagedKVPool.write: {len(prompts)} requests but {len(rows)} free rows")
        L, K, H = self.config.n_layers, self.config.n_kv_heads, self.config.head_dim
        for rid, (pk, pv) in prompts.items():
            P = int(pk[0].shape[0]) if len(pk) else 0
            want = [(P, K, H)] * L
            if P < 1 or [tuple(a.shape) for a in pk] != want or [tuple(a.shape) for a in pv] != want:
                raise ValueError(
                    f"PagedKVPool.write: request {rid}'s k and v must be {L} arrays (P, K, H) = (P, {K}, {H}) "
                    f"each, P >= 1, got {[tuple(a.shape) for a in pk]} and {[tuple(a.shape) for a in pv]}"
                )
        staged = {rows[i]: int(kv[0][0].shape[0]) for i, kv in enumerate(prompts.values())}
        self.map.staged = staged
        try:
            self.cache.reserve(max(staged.values()))  # the staged rows take their prompts' blocks
        except ValueError:
            self.map.staged = None
            raise
        # Only the prompts' own tokens are written, at their slots: a whole-batch `update` of (B, n) rows
        # and its read of every row cost 10 ms on torch for one 384-token prompt, a stall of every
        # running request. The rows are padded with scratch slots to a power of two of at least
        # max_seq_len, so a write of one prompt has one shape, which JAX compiles in the engine's warm-up
        # (250 ms a new shape, one stall of every running request).
        slots = np.concatenate([self.map._slot(row, np.arange(length)) for row, length in staged.items()])
        total = len(slots)
        n = 1 << (max(total, self.config.max_seq_len) - 1).bit_length()
        slots = np.concatenate([slots, self.map._slot_idle(np.arange(n - total))])  # (n,)
        k, v = np.zeros((L, n, K, H), self.dtype), np.zeros((L, n, K, H), self.dtype)  # (L, n, K, H)
        k[:, :total] = np.concatenate([np.stack(pk) for pk, _ in prompts.values()], axis=1)
        v[:, :total] = np.concatenate([np.stack(pv) for _, pv in prompts.values()], axis=1)
        self.cache.write_slots(slots, self.be.asarray(k, dtype=self.dtype), self.be.asarray(v, dtype=self.dtype))
        self.cache.advance(max(staged.values()))
        self.rows.update(zip(prompts, staged))

    def read(self, rid: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Request ``rid``'s stored keys and values, NumPy (T, K, H) per layer."""
        row = np.array([self.rows[rid]])
        k, v = [], []
        for layer in range(self.config.n_layers):
            k_all, v_all = self.cache.read(layer, row)  # (1, T, K, H)
            k.append(self.be.to_numpy(k_all)[0])
            v.append(self.be.to_numpy(v_all)[0])
        return k, v

    def release(self, rid: int) -> None:
        self.cache.free(self.rows.pop(rid))
