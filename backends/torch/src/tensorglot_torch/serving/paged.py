"""The decode side's paged KV cache: a pool of blocks shared by requests that come and go.

`PagedKVPool` owns, per layer, storage of ``num_blocks · block_size`` slots of (K, H) made by the
serving backend (NumPy arrays or torch tensors: only ``be.asarray``, fancy-index assignment and
gathering are used), a block table per request and a free list (lowest block first, as in
`tensorglot.cache.PagedSlotMap`). `PagedKVPool.view` returns a `tensorglot.cache.KVCache` over the
requests of one decode step, so ``be.layers.transformer(tokens, params, config, cache=view)`` runs a
batch of sequences of different lengths (continuous batching) through the spec's public API: requests
join (`insert`) and leave (`free`) between steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorglot.params import TransformerConfig


class PagedKVPool:
    def __init__(self, be: Any, config: TransformerConfig, *, num_blocks: int, block_size: int, dtype: str) -> None:
        self.be, self.config = be, config
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        shape = (num_blocks * block_size, config.n_kv_heads, config.head_dim)  # (slots, K, H)
        self.k = [be.asarray(np.zeros(shape), dtype=dtype) for _ in range(config.n_layers)]
        self.v = [be.asarray(np.zeros(shape), dtype=dtype) for _ in range(config.n_layers)]
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self._free = list(range(num_blocks))

    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _grow(self, rid: int, length: int) -> None:
        need = self.blocks_for(length) - len(self.tables[rid])
        if need > len(self._free):
            raise ValueError(
                f"PagedKVPool: request {rid} needs {need} more blocks of {self.block_size} tokens but only "
                f"{len(self._free)} of {self.num_blocks} are free"
            )
        self._free.sort()
        self.tables[rid].extend(self._free[:need])
        del self._free[:need]

    def slots(self, rid: int, positions: np.ndarray) -> np.ndarray:
        table = np.asarray(self.tables[rid] or [0], dtype=np.int64)
        block = np.minimum(positions // self.block_size, len(table) - 1)  # past the table: masked later
        return table[block] * self.block_size + positions % self.block_size

    def insert(self, rid: int, k: list[np.ndarray], v: list[np.ndarray]) -> None:
        """Admit request ``rid`` with its prompt's keys and values, per layer (P, K, H) each."""
        if rid in self.tables:
            raise ValueError(f"PagedKVPool.insert: request {rid} is already in the pool")
        length = int(k[0].shape[0])
        self.tables[rid], self.lengths[rid] = [], 0
        try:
            self._grow(rid, length)
        except ValueError:
            del self.tables[rid], self.lengths[rid]
            raise
        index = self.be.asarray(self.slots(rid, np.arange(length)), dtype="int64")  # (P,)
        for layer in range(self.config.n_layers):
            self.k[layer][index] = self.be.asarray(k[layer], dtype=self.dtype)
            self.v[layer][index] = self.be.asarray(v[layer], dtype=self.dtype)
        self.lengths[rid] = length

    def read(self, rid: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Request ``rid``'s stored keys and values as NumPy (T, K, H) per layer (for tests)."""
        index = self.be.asarray(self.slots(rid, np.arange(self.lengths[rid])), dtype="int64")
        to_np = self.be.to_numpy
        return [to_np(x[index]) for x in self.k], [to_np(x[index]) for x in self.v]

    def free(self, rid: int) -> None:
        self._free.extend(self.tables.pop(rid))
        del self.lengths[rid]

    def view(self, rids: list[int]) -> _StepView:
        return _StepView(self, list(rids))


class _StepView:
    """A `tensorglot.cache.KVCache` whose sequence b is request ``rids[b]`` of the pool."""

    kind = "paged"

    def __init__(self, pool: PagedKVPool, rids: list[int]) -> None:
        self.pool, self.rids = pool, rids
        self.batch = len(rids)
        self.max_len = pool.config.max_seq_len
        self.n_layers, self.n_kv_heads = pool.config.n_layers, pool.config.n_kv_heads
        self.head_dim = pool.config.head_dim
        self.block_size, self.num_blocks = pool.block_size, pool.num_blocks
        self.pending = 0
        self._index: tuple[Any, Any] | None = None

    def lengths(self) -> np.ndarray:
        return np.array([self.pool.lengths[r] for r in self.rids], dtype=np.int64)

    def reserve(self, n: int, /) -> None:
        lengths = self.lengths()
        if int(lengths.max()) + n > self.max_len:
            raise ValueError(f"kv_cache.reserve: {n} more tokens pass max_len = {self.max_len}")
        need = sum(
            max(0, self.pool.blocks_for(int(t) + n) - len(self.pool.tables[r])) for r, t in zip(self.rids, lengths)
        )
        if need > self.pool.free_blocks():
            raise ValueError(f"kv_cache.reserve: {need} blocks needed, {self.pool.free_blocks()} free")
        for r, t in zip(self.rids, lengths):
            self.pool._grow(r, int(t) + n)
        self.pending, self._index = n, None

    def update(self, layer: int, k: Any, v: Any, /) -> tuple[Any, Any]:
        be, pool, n = self.pool.be, self.pool, self.pending
        if self._index is None:  # the same slots for every layer of a step
            lengths = self.lengths()
            write = np.concatenate([pool.slots(r, t + np.arange(n)) for r, t in zip(self.rids, lengths)])
            T = int(lengths.max()) + n
            read = np.stack([pool.slots(r, np.arange(T)) for r in self.rids])  # (B, T)
            self._index = (be.asarray(write, dtype="int64"), be.asarray(read, dtype="int64"))
        write_index, read_index = self._index
        K, H = self.n_kv_heads, self.head_dim
        pool.k[layer][write_index] = k.reshape(self.batch * n, K, H)  # (B·n, K, H)
        pool.v[layer][write_index] = v.reshape(self.batch * n, K, H)
        return pool.k[layer][read_index], pool.v[layer][read_index]  # (B, T, K, H)

    def advance(self, n: int, /) -> None:
        for r in self.rids:
            self.pool.lengths[r] += n
        self.pending, self._index = 0, None

    def free(self, seq: int, /) -> None:
        self.pool.free(self.rids[seq])

    def reset(self) -> None:
        for r in self.rids:
            self.pool.free(r)

    def block_table(self, seq: int, /) -> list[int]:
        return list(self.pool.tables[self.rids[seq]])

    def free_blocks(self) -> int:
        return self.pool.free_blocks()
