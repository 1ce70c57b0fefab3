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
  * ``contiguous``: per layer, storage (K, B, max_len, H); token p of sequence b lives at [:, b, p].
  * ``paged`` (vLLM's PagedAttention, arXiv:2309.06180): per layer, a pool of ``num_blocks`` blocks of
    (K, block_size, H); each sequence has a block table (a list of block ids) and a shared free list
    hands blocks out as sequences grow. Token p of sequence b lives in block
    ``table[b][p // block_size]`` at offset ``p % block_size``. `free` (a sequence ended) returns its
    blocks to the free list; after a batch finishes and every sequence is freed, no block is leaked.

The spec keeps the bookkeeping (lengths, block tables, the free list, the capacity check, each token's
slot: `SlotMap`, `PagedSlotMap`) and the storage, per layer one (K, slots, H) array made with the array
API's ``zeros`` and read with ``take``. The backend writes one kernel, ``cache_write(storage, slots,
rows) -> storage`` (in place on NumPy, torch and xp's writable namespaces, ``.at[].set`` on JAX): the array
API has no write at integer positions.

The storage is kv-head-major, (K, slots, H), though `read` returns (B, T, K, H) (a view of it): the G
query heads that share kv head k then meet one contiguous (T, H) block of keys per sequence, which a
kernel takes back as a view, (K·B, T, H), with no copy and no G-fold product. (B, T, K, H) storage
interleaves the K heads in each row, so a kernel either copies every key each step or multiplies each query
head against all K kv heads: torch's decoding step measured 2–5× slower that way at Llama's N = 32, K = 8,
H = 128 (T = 512–2048; `docs/torch.md`). `kv_head_major` and `kv_head_inner` are the two conversions,
for `KVCache` and `tensorglot.static_cache.StaticCache` alike.

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

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from . import checks
from .slot_map import BLOCK_SIZE as BLOCK_SIZE
from .slot_map import KINDS as KINDS
from .slot_map import CacheKind as CacheKind
from .slot_map import PagedSlotMap as PagedSlotMap
from .slot_map import SlotMap as SlotMap
from .slot_map import make_slot_map as make_slot_map
from .slot_map import visible_mask as visible_mask

Array = Any


# -- the storage layout ----------------------------------------------------------------------------


def kv_head_major(xp: Any, rows: Array) -> Array:
    """(n, K, H) rows to write as the storage holds them, (K, n, H): what ``cache_write`` takes."""
    return xp.permute_dims(rows, (1, 0, 2))


def kv_head_inner(xp: Any, stored: Array) -> Array:
    """(K, R, T, H) read from the storage as `KVCache.read` returns it, (R, T, K, H): a view."""
    return xp.permute_dims(stored, (1, 2, 0, 3))


# -- the cache -------------------------------------------------------------------------------------


class KVCache:
    """The KV cache of one backend: a `SlotMap` for the bookkeeping, per layer a (K, slots, H) array.

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
        self._write: Array | None = None  # this step's write slots, (B·n,) on the storage's device
        self._reads: dict[bytes | None, tuple[Array | None, int]] = {}  # this step's read slots and T, by rows

    def lengths(self) -> np.ndarray:
        """(B,) int64 NumPy array: the tokens each sequence holds (a copy)."""
        return self.map.lengths()

    def reserve(self, n: int, /) -> None:
        """Make room for ``n`` more tokens in every sequence (a paged cache takes blocks from the free
        list). Raises ValueError — and changes nothing — when a sequence would pass ``max_len`` or the
        pool has too few free blocks."""
        self.map.reserve(n)
        self._forget()

    def cancel(self) -> None:
        """Undo the last `reserve` when its step fails before `advance`: the lengths, block tables and
        free list are as they were (what the failed step wrote sits past the lengths, so it is never
        read). `tensorglot.layers.Layers.transformer` calls it, so a failed call changes no cache."""
        self.map.cancel()
        self._forget()

    def update(self, layer: int, k: Array, v: Array, /) -> tuple[Array, Array]:
        """Write the new keys (after RoPE) and values, (B, n, K, H) for the n reserved tokens, at
        positions ``lengths()[b] ..`` of layer ``layer``; return every stored key and value of that layer
        as (B, T, K, H) with ``T = max(lengths()) + n``. Entries at or past ``lengths()[b] + n`` are
        unspecified: callers mask them. Does not advance the lengths. `write` then `read`."""
        self._write_step("kv_cache.update", layer, k, v)
        return self.read(layer)

    def write(self, layer: int, k: Array, v: Array, /) -> None:
        """`update`'s write: the n reserved tokens' keys and values, (B, n, K, H), into layer ``layer``."""
        self._write_step("kv_cache.write", layer, k, v)

    def _write_step(self, fn: str, layer: int, k: Array, v: Array) -> None:
        self._check_layer(fn, layer)
        B, n, K, H = self.batch, self.map.pending, self.n_kv_heads, self.head_dim
        want = (B, n, K, H)
        checks.check_same_shape(fn, "k", tuple(k.shape), want, f"(B, n, K, H) for the {n} reserved tokens")
        checks.check_same_shape(fn, "v", tuple(v.shape), want, "k")
        self._check_arrays(fn, k, v)
        xp = self._xp
        if self._write is None:  # the same slots for every layer of a step
            self._write = xp.asarray(self.map.slots().reshape(-1), device=device(self.k[0]))  # (B·n,)
        self._store(layer, self._write, *(xp.reshape(x, (B * n, K, H)) for x in (k, v)))

    def read(self, layer: int, rows: np.ndarray | None = None, /) -> tuple[Array, Array]:
        """Layer ``layer``'s stored keys and values of sequences ``rows`` (NumPy ints; None: every one, in
        order), (R, T, K, H) with ``T = max(lengths()[rows]) + pending``: what `update` returns, for a
        subset of the batch read only as far as its own longest sequence (a decoding step's short
        sequences then do not pay for one long one: `tensorglot.slot_map.row_groups`)."""
        fn = "kv_cache.read"
        self._check_layer(fn, layer)
        if not self.k:
            raise ValueError(f"{fn}: nothing was written yet")
        if rows is not None:
            rows = _indices(fn, "rows", rows, self.batch)
            if not len(rows):
                raise ValueError(f"{fn}: rows must name at least one sequence (None reads every one)")
        key = None if rows is None else rows.tobytes()
        if key not in self._reads:  # the same indices for every layer of a step
            T = self.map.visible(rows)
            at = None
            if self.kind != "contiguous" or rows is not None:
                at = self._xp.asarray(self.map.gather(T, rows).reshape(-1), device=device(self.k[0]))  # (R·T,)
            self._reads[key] = (at, T)
        at, T = self._reads[key]
        xp, R, K, H = self._xp, self.batch if rows is None else len(rows), self.n_kv_heads, self.head_dim
        if at is None:  # contiguous: slot b·max_len + p is [:, b, p], so a reshape (a view) reads it
            kv = (xp.reshape(s[layer], (K, R, self.max_len, H))[:, :, :T, :] for s in (self.k, self.v))
        else:
            kv = (xp.reshape(xp.take(s[layer], at, axis=1), (K, R, T, H)) for s in (self.k, self.v))
        k, v = (kv_head_inner(xp, x) for x in kv)
        return k, v

    def write_slots(self, slots: np.ndarray, k: Array, v: Array, /) -> None:
        """Write keys and values of every layer, (L, n, K, H), at storage slots ``slots`` ((n,) NumPy
        ints), lengths unchanged: what the serving pool admits a prompt with (`tensorglot.serving.pool`)."""
        fn = "kv_cache.write_slots"
        slots = _indices(fn, "slots", slots, self.map.num_slots)
        want = (self.n_layers, len(slots), self.n_kv_heads, self.head_dim)
        checks.check_same_shape(fn, "k", tuple(k.shape), want, "(L, n, K, H) for the n slots")
        checks.check_same_shape(fn, "v", tuple(v.shape), want, "k")
        self._check_arrays(fn, k, v)
        at = self._xp.asarray(slots, device=device(self.k[0]))
        for layer in range(self.n_layers):
            self._store(layer, at, k[layer, ...], v[layer, ...])

    def _check_layer(self, fn: str, layer: Any) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"{fn}: layer must be an int in [0, {self.n_layers}), got {layer!r}")

    def _check_arrays(self, fn: str, k: Array, v: Array) -> None:
        """The dtype and device of keys and values to write; the storage is made on the first write."""
        be = self._be
        got = (be.dtype_name(k), be.dtype_name(v))
        if got != (self.dtype, self.dtype):
            raise TypeError(f"{fn}: k and v have dtypes {got[0]}, {got[1]}; the cache stores {self.dtype}")
        if not self.k:
            self.allocate(k)
        if be.device(k) != self.device or be.device(v) != self.device:
            raise TypeError(f"{fn}: k and v are on {be.device(k)}, {be.device(v)}; the cache is on {self.device}")

    def _store(self, layer: int, at: Array, k: Array, v: Array) -> None:
        """Write (n, K, H) rows at slots ``at``: the kernel takes them kv-head-major, (K, n, H)."""
        cache_write, xp = self._be.kernels.cache_write, self._xp
        self.k[layer] = cache_write(self.k[layer], at, kv_head_major(xp, k))
        self.v[layer] = cache_write(self.v[layer], at, kv_head_major(xp, v))

    def _forget(self) -> None:
        """The step's indices change with the lengths: made again by the next `write` or `read`."""
        self._write, self._reads = None, {}

    def allocate(self, like: Array, /) -> None:
        """Make the storage, zeros of ``like``'s library, dtype and device. `update` calls it on its first
        write, so a cache is made where the model runs."""
        self._xp, self.device = array_namespace(like), self._be.device(like)
        rows = (self.n_kv_heads, self.map.num_slots, self.head_dim)  # (K, slots, H)
        self.k = [self._xp.zeros(rows, dtype=like.dtype, device=device(like)) for _ in range(self.n_layers)]
        self.v = [self._xp.zeros(rows, dtype=like.dtype, device=device(like)) for _ in range(self.n_layers)]

    def advance(self, n: int, /) -> None:
        """Count the ``n`` tokens written by `update` in every layer: ``lengths() += n``."""
        self.map.advance(n)
        self._forget()

    def free(self, seq: int, /) -> None:
        """Sequence ``seq`` ended: its length becomes 0 (the row can start a new sequence) and a paged
        cache returns its blocks to the free list."""
        self.map.free(seq)

    def reset(self) -> None:
        """Free every sequence."""
        self.map.reset()
        self._forget()

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


def _indices(fn: str, name: str, values: Any, bound: int) -> np.ndarray:
    """``values`` as a 1-D NumPy int64 array, each in [0, bound): rows of a read, slots of a write."""
    a = np.asarray(values)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{fn}: {name} must be a 1-D NumPy array of ints, got {a.dtype} {a.shape}")
    if len(a) and not 0 <= int(a.min()) <= int(a.max()) < bound:
        raise ValueError(f"{fn}: {name} must be in [0, {bound}), got {a.min()}..{a.max()}")
    return a.astype(np.int64, copy=False)


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
