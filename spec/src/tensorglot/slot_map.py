"""A KV cache's host-side bookkeeping, the same for every backend: each sequence's length, the capacity
check, a paged cache's block tables and free list, each token's slot in the storage, and the visibility
mask of a cached step. `tensorglot.cache.KVCache` keeps its storage; JAX's compiled decoding
(`tensorglot.static_cache`) and the serving pool (`tensorglot.serving.pool`) use these same maps.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from array_api_compat import array_namespace, device

from . import checks

Array = Any
CacheKind = Literal["contiguous", "paged"]
KINDS = ("contiguous", "paged")
#: Tokens per block of a paged cache unless told otherwise (`kv_cache`, and the caches `generate` makes).
BLOCK_SIZE = 16


class SlotMap:
    """Lengths, the capacity check and token slots of a contiguous cache, for any backend.

    Storage is viewed as ``num_slots = batch · max_len`` slots of (K, H): token p of sequence b is slot
    ``b · max_len + p``, so a (K, B·max_len, H) array (the cache's) reshaped to (K, B, max_len, H) is
    indexed by it.
    """

    kind = "contiguous"

    def __init__(self, batch: int, max_len: int) -> None:
        self.batch = checks.check_positive_int("kv_cache", "batch", batch)
        self.max_len = checks.check_positive_int("kv_cache", "max_len", max_len)
        self._lengths = np.zeros(self.batch, dtype=np.int64)
        self.pending = 0  # tokens reserved but not yet advanced
        self._taken = [0] * self.batch  # blocks the pending reserve took per sequence (paged), for `cancel`

    @property
    def num_slots(self) -> int:
        return self.batch * self.max_len

    def lengths(self) -> np.ndarray:
        return self._lengths.copy()

    def _check_room(self, n: int) -> int:
        n = checks.check_positive_int("kv_cache.reserve", "n", n)
        longest = int(self._lengths.max())
        if longest + n > self.max_len:
            seq = int(self._lengths.argmax())
            raise ValueError(
                f"kv_cache.reserve: sequence {seq} holds {longest} tokens; {n} more would make "
                f"{longest + n} > max_len = {self.max_len} (the cache is unchanged)"
            )
        return n

    def reserve(self, n: int, /) -> None:
        self.pending = self._check_room(n)

    def cancel(self) -> None:
        """Undo the pending `reserve` (the step failed before `advance`): the map is as it was before."""
        self.pending = 0

    def slots(self) -> np.ndarray:
        """(B, pending) int64: the slot of each reserved token."""
        pos = self._lengths[:, None] + np.arange(self.pending)  # (B, n)
        return np.arange(self.batch)[:, None] * self.max_len + pos

    def gather(self, t: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(R, t) int64: the slots of positions 0 .. t − 1 of sequences ``rows`` (None: all B, in order)."""
        rows = np.arange(self.batch) if rows is None else np.asarray(rows)
        return rows[:, None] * self.max_len + np.arange(t)

    def visible(self, rows: np.ndarray | None = None) -> int:
        """T, the key length a read of sequences ``rows`` returns (None: every one, what `update` returns):
        their longest length + pending."""
        return int((self._lengths if rows is None else self._lengths[rows]).max()) + self.pending

    def advance(self, n: int, /) -> None:
        if n != self.pending:
            raise ValueError(f"kv_cache.advance: {n} tokens advanced but {self.pending} were reserved")
        self._lengths += n
        self.pending = 0
        self._taken = [0] * self.batch  # the step is done: nothing left to cancel

    def _check_seq(self, seq: int) -> int:
        seq = checks.check_positive_int("kv_cache.free", "seq", seq, allow_zero=True)
        if seq >= self.batch:
            raise ValueError(f"kv_cache.free: seq must be in [0, {self.batch}), got {seq}")
        return seq

    def free(self, seq: int, /) -> None:
        self._lengths[self._check_seq(seq)] = 0

    def reset(self) -> None:
        for seq in range(self.batch):
            self.free(seq)
        self.pending = 0


class PagedSlotMap(SlotMap):
    """Block tables and a free list over a pool of ``num_blocks`` blocks of ``block_size`` tokens.

    Storage is viewed as ``num_slots = num_blocks · block_size`` slots of (K, H); token p of sequence b
    is slot ``table[b][p // block_size] · block_size + p % block_size``. The free list hands out the
    lowest-numbered free block first, so the same calls give the same tables on every backend.
    """

    kind = "paged"

    def __init__(self, batch: int, max_len: int, block_size: int, num_blocks: int | None = None) -> None:
        super().__init__(batch, max_len)
        self.block_size = checks.check_positive_int("kv_cache", "block_size", block_size)
        per_seq = -(-self.max_len // self.block_size)
        self.num_blocks = (
            self.batch * per_seq
            if num_blocks is None
            else checks.check_positive_int("kv_cache", "num_blocks", num_blocks)
        )
        self.tables: list[list[int]] = [[] for _ in range(self.batch)]
        self._free = list(range(self.num_blocks))

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, seq: int, /) -> list[int]:
        return list(self.tables[self._check_seq(seq)])

    def free_blocks(self) -> int:
        return len(self._free)

    def reserve(self, n: int, /) -> None:
        n = self._check_room(n)
        bs = self.block_size
        need = [max(0, -(-(int(length) + n) // bs) - len(table)) for length, table in zip(self._lengths, self.tables)]
        if sum(need) > len(self._free):
            raise ValueError(
                f"kv_cache.reserve: {n} more tokens need {sum(need)} new blocks of {bs} but only "
                f"{len(self._free)} of {self.num_blocks} are free (the cache is unchanged)"
            )
        self._free.sort()
        for table, k in zip(self.tables, need):
            table.extend(self._free[:k])
            del self._free[:k]
        self._taken = need
        self.pending = n

    def cancel(self) -> None:
        for table, k in zip(self.tables, self._taken):
            if k:
                self._free.extend(table[-k:])
                del table[-k:]
        self._taken = [0] * self.batch
        super().cancel()

    def _slot(self, seq: int, pos: np.ndarray) -> np.ndarray:
        table = np.asarray(self.tables[seq] or [0], dtype=np.int64)
        block = np.minimum(pos // self.block_size, len(table) - 1)  # past the table: any slot, masked later
        return table[block] * self.block_size + pos % self.block_size

    def slots(self) -> np.ndarray:
        pos = self._lengths[:, None] + np.arange(self.pending)  # (B, n)
        return np.stack([self._slot(b, pos[b]) for b in range(self.batch)])

    def gather(self, t: int, rows: np.ndarray | None = None) -> np.ndarray:
        pos = np.arange(t)
        return np.stack([self._slot(int(b), pos) for b in (range(self.batch) if rows is None else rows)])  # (R, t)

    def free(self, seq: int, /) -> None:
        seq = self._check_seq(seq)
        self._free.extend(self.tables[seq])
        self.tables[seq] = []
        self._taken[seq] = 0
        self._lengths[seq] = 0


def make_slot_map(
    kind: str, batch: int, max_len: int, /, *, block_size: int = BLOCK_SIZE, num_blocks: int | None = None
) -> SlotMap:
    """The bookkeeping for a cache of ``kind`` (validated)."""
    checks.check_choice("kv_cache", "kind", kind, KINDS)
    if kind == "paged":
        return PagedSlotMap(batch, max_len, block_size, num_blocks)
    return SlotMap(batch, max_len)


def visible_mask(lengths: Array, n: int, t: int, /, *, window: int | None = None) -> Array:
    """Bool (B, 1, n, t): new query i of sequence b sees key j iff ``j <= lengths[b] + i`` (and > that − W).

    The per-sequence, bottom-right causal mask of a cached step; it broadcasts against (B, N, S, T).
    ``lengths`` is any array library's (B,) ints, so the mask is built where they are: on the host for
    a `KVCache`'s NumPy lengths, inside a trace for JAX's compiled decoding.

    >>> from tensorglot.cache import visible_mask
    >>> visible_mask(np.array([1, 0]), 2, 3)[:, 0].astype(int).tolist()
    [[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 1, 0]]]
    """
    xp = array_namespace(lengths)
    where = device(lengths)
    limit = lengths[:, None] + xp.arange(n, dtype=lengths.dtype, device=where)[None, :]  # (B, n)
    keys = xp.arange(t, dtype=lengths.dtype, device=where)[None, None, :]  # (1, 1, t)
    seen = keys <= limit[:, :, None]  # (B, n, t)
    if window is not None:  # a sliding window W
        seen = xp.logical_and(seen, keys > limit[:, :, None] - window)
    return seen[:, None, :, :]  # (B, 1, n, t)


#: What reading one more group of rows costs, in key rows read (its own gather, attention call, mask and
#: the permutation back): a step's rows are split only when that saves more. On torch one layer's
#: attention over 16 × 386 keys is ≈ 330 µs (≈ 0.05 µs a key row) and a group's own ops ≈ 60–100 µs.
GROUP_COST = 2048


def row_groups(lengths: np.ndarray, n: int, /) -> list[np.ndarray]:
    """The rows of a cached step of ``n`` tokens, split into at most two groups by length: the shorter
    ones and the longer ones, each then read (`tensorglot.cache.KVCache.read`) and attended only as far
    as its own longest row. Padded to the batch's longest, one long prompt beside short chats makes
    every row read and score as many keys as it (16 rows × 386 keys where the rows hold 1.4k).

    Returns ``[arange(B)]`` (one group, the rows in order) unless splitting saves more than
    `GROUP_COST` key rows; else ``[short, long]``, each ascending by length (ties in row order).

    >>> [g.tolist() for g in row_groups(np.array([400, 5, 0, 7, 3, 2, 1, 4]), 1)]
    [[2, 6, 5, 4, 7, 1, 3], [0]]
    >>> [g.tolist() for g in row_groups(np.array([30, 5, 0, 7]), 1)]
    [[0, 1, 2, 3]]
    """
    n = checks.check_positive_int("row_groups", "n", n)
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(f"row_groups: lengths must be a 1-D array of ints, got {lengths.dtype} {lengths.shape}")
    if (lengths < 0).any():
        raise ValueError(f"row_groups: lengths must be >= 0, got {lengths.tolist()}")
    B = len(lengths)
    order = np.argsort(lengths, kind="stable")
    seen = lengths[order] + n  # (B,) each row's keys, ascending
    cut = np.arange(1, B)  # rows order[:cut] short, the rest long
    split = cut * seen[cut - 1] + (B - cut) * seen[-1] + GROUP_COST
    if B < 2 or split.min() >= B * seen[-1]:
        return [np.arange(B)]
    i = int(cut[split.argmin()])
    return [order[:i], order[i:]]
