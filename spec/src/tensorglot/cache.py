"""The KV cache: one class, two layouts (contiguous and paged), written once for every backend.

A KV cache holds, for each layer, the keys and values of the tokens a batch of sequences has seen, so
that decoding one more token costs one token's work instead of re-running the prefix. Conventions
(pinned):
  * Keys are stored **after** RoPE (each at its own position), values as projected; the cache never
    rotates again.
  * Sequence ``b`` holds ``lengths()[b]`` tokens, at positions ``0 .. lengths()[b] − 1``. A forward
    pass of S new tokens writes them at positions ``lengths()[b] .. lengths()[b] + S − 1`` in every
    layer and then advances every length by S. Sequences in one batch may hold different lengths (a
    sequence that ended was `free`d and started again).
  * Capacity: a sequence holds at most ``max_len`` tokens (and a paged cache has ``num_blocks`` blocks
    of ``block_size`` tokens in all). `reserve` checks the capacity of a whole step before anything is
    written: past it, it raises ValueError and the cache is exactly as it was.

How ``layers.transformer(tokens, params, config, cache=c)`` drives a cache: `check_cache` first (the
class, the batch, the model's sizes, the dtype and device of the parameters: nothing is reserved for a
call that cannot run); then ``c.reserve(S)`` once; per layer ``k_all, v_all = c.update(layer, k, v)``
and attention of the new queries over ``k_all, v_all`` with key j of sequence b visible to its query i
iff ``j <= lengths()[b] + i``, lengths taken before the step (bottom-right causal per sequence;
`visible_mask`); then ``c.advance(S)``.

Layouts:
  * ``contiguous``: per layer, storage (B, max_len, K, H); token p of sequence b lives at [b, p].
  * ``paged`` (vLLM's PagedAttention, arXiv:2309.06180): per layer, a pool of ``num_blocks`` blocks of
    (block_size, K, H); each sequence has a block table (a list of block ids) and a shared free list
    hands blocks out as sequences grow. Token p of sequence b lives in block
    ``table[b][p // block_size]`` at offset ``p % block_size``. `free` (a sequence ended) returns its
    blocks to the free list; after a batch finishes and every sequence is freed, no block is leaked.

The spec keeps the bookkeeping (lengths, block tables, the free list, the capacity check, each token's
slot: `SlotMap`, `PagedSlotMap`) and the storage, per layer one (slots, K, H) array made with the array
API's ``zeros`` and read with ``take``. The backend writes one kernel, ``cache_write(storage, slots,
rows) -> storage`` (in place on NumPy, torch and xp's writable namespaces, ``.at[].set`` on JAX): the array
API has no write at integer positions.

>>> import numpy as np, tensorglot
>>> cfg = tensorglot.TransformerConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
...                                    head_dim=4, d_ff=16)
>>> be = tensorglot.get_backend("numpy")
>>> cache = be.layers.kv_cache(cfg, 2, 8, kind="paged", block_size=4)
>>> params = tensorglot.init_params(cfg, 0)
>>> logits = be.layers.transformer(np.array([[1, 2, 3], [4, 5, 6]]), params, cfg, cache=cache)
>>> cache.lengths().tolist(), cache.block_table(0), cache.free_blocks()
([3, 3], [0], 2)
>>> cache.free(0); cache.free(1); cache.free_blocks()
4
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


# -- the shared host-side bookkeeping --------------------------------------------------------------


class SlotMap:
    """Lengths, the capacity check and token slots of a contiguous cache, for any backend.

    Storage is viewed as ``num_slots = batch · max_len`` rows of (K, H): token p of sequence b is slot
    ``b · max_len + p``, so a (B, max_len, K, H) array reshaped to (B·max_len, K, H) is indexed by it.
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

    def gather(self, t: int) -> np.ndarray:
        """(B, t) int64: the slots of positions 0 .. t − 1 of each sequence."""
        return np.arange(self.batch)[:, None] * self.max_len + np.arange(t)

    def visible(self) -> int:
        """T, the key length `update` returns: max(lengths) + pending."""
        return int(self._lengths.max()) + self.pending

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

    Storage is viewed as ``num_slots = num_blocks · block_size`` rows of (K, H); token p of sequence b
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

    def gather(self, t: int) -> np.ndarray:
        pos = np.arange(t)
        return np.stack([self._slot(b, pos) for b in range(self.batch)])  # (B, t)

    def free(self, seq: int, /) -> None:
        seq = self._check_seq(seq)
        self._free.extend(self.tables[seq])
        self.tables[seq] = []
        self._taken[seq] = 0
        self._lengths[seq] = 0


# -- the cache -------------------------------------------------------------------------------------


class KVCache:
    """The KV cache of one backend: a `SlotMap` for the bookkeeping, per layer a (slots, K, H) array.

    Made by ``backend.layers.kv_cache`` (`kv_cache`). Attributes: ``kind``, ``batch`` (B), ``max_len``,
    ``n_layers``, ``n_kv_heads`` (K), ``head_dim`` (H), ``dtype`` (the storage dtype's name) and
    ``device`` (None until the first `update`, then the keys' device).
    """

    def __init__(self, backend: Any, config: Any, slot_map: SlotMap, dtype: str) -> None:
        self._be = backend
        self.map = slot_map
        self.kind = slot_map.kind
        self.batch, self.max_len = slot_map.batch, slot_map.max_len
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.dtype = dtype
        self.device: Any = None
        self._xp: Any = None
        self.k: list[Array] = []
        self.v: list[Array] = []
        self._step: tuple[Array, Array | None, int] | None = None  # this step's write and read indices

    def lengths(self) -> np.ndarray:
        """(B,) int64 NumPy array: the tokens each sequence holds (a copy)."""
        return self.map.lengths()

    def reserve(self, n: int, /) -> None:
        """Make room for ``n`` more tokens in every sequence (a paged cache takes blocks from the free
        list). Raises ValueError — and changes nothing — when a sequence would pass ``max_len`` or the
        pool has too few free blocks."""
        self.map.reserve(n)
        self._step = None

    def cancel(self) -> None:
        """Undo the last `reserve` when its step fails before `advance`: the lengths, block tables and
        free list are as they were (what the failed step wrote sits past the lengths, so it is never
        read). `tensorglot.layers.Layers.transformer` calls it, so a failed call changes no cache."""
        self.map.cancel()
        self._step = None

    def update(self, layer: int, k: Array, v: Array, /) -> tuple[Array, Array]:
        """Write the new keys (after RoPE) and values, (B, n, K, H) for the n reserved tokens, at
        positions ``lengths()[b] ..`` of layer ``layer``; return every stored key and value of that layer
        as (B, T, K, H) with ``T = max(lengths()) + n``. Entries at or past ``lengths()[b] + n`` are
        unspecified: callers mask them. Does not advance the lengths."""
        fn = "kv_cache.update"
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"{fn}: layer must be an int in [0, {self.n_layers}), got {layer!r}")
        B, n, K, H = self.batch, self.map.pending, self.n_kv_heads, self.head_dim
        want = (B, n, K, H)
        checks.check_same_shape(fn, "k", tuple(k.shape), want, f"(B, n, K, H) for the {n} reserved tokens")
        checks.check_same_shape(fn, "v", tuple(v.shape), want, "k")
        be = self._be
        got = (be.dtype_name(k), be.dtype_name(v))
        if got != (self.dtype, self.dtype):
            raise TypeError(f"{fn}: k and v have dtypes {got[0]}, {got[1]}; the cache stores {self.dtype}")
        if not self.k:
            self.allocate(k)
        if be.device(k) != self.device or be.device(v) != self.device:
            raise TypeError(f"{fn}: k and v are on {be.device(k)}, {be.device(v)}; the cache is on {self.device}")
        xp = self._xp
        if self._step is None:  # the same indices for every layer of a step
            T = self.map.visible()
            where = device(self.k[0])
            write = xp.asarray(self.map.slots().reshape(-1), device=where)  # (B·n,)
            read = None if self.kind == "contiguous" else self.map.gather(T).reshape(-1)  # (B·T,)
            self._step = (write, None if read is None else xp.asarray(read, device=where), T)
        write, read, T = self._step
        cache_write = be.kernels.cache_write
        self.k[layer] = cache_write(self.k[layer], write, xp.reshape(k, (B * n, K, H)))
        self.v[layer] = cache_write(self.v[layer], write, xp.reshape(v, (B * n, K, H)))
        if read is None:  # contiguous: slot b·max_len + p is [b, p], so a reshape (a view) reads it
            view = (B, self.max_len, K, H)
            return xp.reshape(self.k[layer], view)[:, :T, ...], xp.reshape(self.v[layer], view)[:, :T, ...]
        return (
            xp.reshape(xp.take(self.k[layer], read, axis=0), (B, T, K, H)),
            xp.reshape(xp.take(self.v[layer], read, axis=0), (B, T, K, H)),
        )

    def allocate(self, like: Array, /) -> None:
        """Make the storage, zeros of ``like``'s library, dtype and device. `update` calls it on its first
        write, so a cache is made where the model runs."""
        self._xp, self.device = array_namespace(like), self._be.device(like)
        rows = (self.map.num_slots, self.n_kv_heads, self.head_dim)  # (slots, K, H)
        self.k = [self._xp.zeros(rows, dtype=like.dtype, device=device(like)) for _ in range(self.n_layers)]
        self.v = [self._xp.zeros(rows, dtype=like.dtype, device=device(like)) for _ in range(self.n_layers)]

    def advance(self, n: int, /) -> None:
        """Count the ``n`` tokens written by `update` in every layer: ``lengths() += n``."""
        self.map.advance(n)
        self._step = None

    def free(self, seq: int, /) -> None:
        """Sequence ``seq`` ended: its length becomes 0 (the row can start a new sequence) and a paged
        cache returns its blocks to the free list."""
        self.map.free(seq)

    def reset(self) -> None:
        """Free every sequence."""
        self.map.reset()
        self._step = None

    def __repr__(self) -> str:
        where = "" if self.device is None else f" on {self.device}"
        sizes = f"batch {self.batch}, max_len {self.max_len}, lengths {self.lengths().tolist()}"
        return f"<{self._be.name} {self.kind} KV cache{where}: {self.dtype}, {sizes}>"


class PagedKVCache(KVCache):
    """A paged `KVCache` also exposes its block bookkeeping."""

    map: PagedSlotMap

    block_size = property(lambda self: self.map.block_size)
    num_blocks = property(lambda self: self.map.num_blocks)

    def block_table(self, seq: int, /) -> list[int]:
        """The block ids sequence ``seq`` holds, in position order."""
        return self.map.block_table(seq)

    def free_blocks(self) -> int:
        """How many blocks are on the free list."""
        return self.map.free_blocks()


def kv_cache(
    backend: Any,
    config: Any,
    batch: int,
    max_len: int,
    /,
    *,
    kind: CacheKind = "contiguous",
    block_size: int = BLOCK_SIZE,
    num_blocks: int | None = None,
    dtype: str = "float32",
) -> KVCache:
    """`tensorglot.layers.Layers.kv_cache` for ``backend``: an empty cache (validated)."""
    from .params import TransformerConfig

    fn = "kv_cache"
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
    checks.check_choice(fn, "dtype", dtype, checks.FLOAT_DTYPES)
    max_len = checks.check_positive_int(fn, "max_len", max_len)
    if max_len > config.max_seq_len:
        raise ValueError(f"{fn}: max_len = {max_len} is past the config's max_seq_len = {config.max_seq_len}")
    slot_map = make_slot_map(kind, batch, max_len, block_size=block_size, num_blocks=num_blocks)
    return (PagedKVCache if kind == "paged" else KVCache)(backend, config, slot_map, dtype)


def check_cache(
    fn: str, cache: Any, batch: int, config: Any, /, *, backend: Any, dtype: str, device: Any = None
) -> None:
    """Raise unless ``cache`` is a `KVCache` of ``backend`` for ``batch`` sequences of ``config``'s model,
    storing ``dtype`` (the parameters') on ``device`` (once it has storage). Runs before
    `KVCache.reserve`, so a call that cannot run takes no block."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"{fn}: cache must be a KVCache (made by layers.kv_cache), got {type(cache).__name__}")
    if cache._be.name != backend.name:  # its storage is that backend's arrays, written by its kernel
        raise TypeError(f"{fn}: the cache was made by the {cache._be.name} backend; this is {backend.name}")
    if cache.batch != batch:
        raise ValueError(f"{fn}: the cache holds {cache.batch} sequences but tokens have batch {batch}")
    got = (cache.n_layers, cache.n_kv_heads, cache.head_dim)
    want = (config.n_layers, config.n_kv_heads, config.head_dim)
    if got != want:
        raise ValueError(f"{fn}: the cache has (layers, K, H) = {got}, the config {want}")
    if cache.dtype != dtype:
        raise TypeError(f"{fn}: the params have dtype {dtype}; the cache stores {cache.dtype}")
    if cache.device is not None and device is not None and cache.device != device:
        raise TypeError(f"{fn}: the params are on {device}; the cache is on {cache.device}")


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
