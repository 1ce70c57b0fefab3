"""JAX KV caches: see the spec, `tensorglot.cache`.

JAX arrays are immutable, so a cache is two things here:
  * `write` and `read`, pure functions over static-shape storage: contiguous (B, max_len, K, H) per layer,
    written with `lax.dynamic_update_slice` at each sequence's length; paged (num_blocks · block_size,
    K, H) per layer, written and gathered through a block table. `update` returns all ``max_len`` keys
    (T = max_len, the unwritten ones masked by the caller), so a jitted step never recompiles as the
    cache fills.
  * `JaxKVCache`, the spec's stateful handle: the shared host bookkeeping (`SlotMap`/`PagedSlotMap`)
    plus the storage arrays, rebound after each functional update.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tensorglot import checks
from tensorglot.cache import SlotMap, SlotMapCache, make_slot_map, visible_mask
from tensorglot.params import TransformerConfig

_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def write(storage, new, lengths, slots, kind):
    """Write ``new`` (B, n, K, H) at positions ``lengths[b] ..`` (contiguous) or at ``slots`` (B, n) (paged)."""
    if kind == "contiguous":
        zero = jnp.zeros((), lengths.dtype)  # the indices must share one int dtype (int64 under x64)
        put = lambda s, x, start: lax.dynamic_update_slice(s, x, (start, zero, zero))  # noqa: E731
        return jax.vmap(put)(storage, new.astype(storage.dtype), lengths)  # (B, max_len, K, H)
    flat = new.reshape(-1, *new.shape[2:])  # (B·n, K, H)
    return storage.at[slots.reshape(-1)].set(flat.astype(storage.dtype))  # (slots, K, H)


def read(storage, gather, kind):
    """Every stored key of each sequence, (B, T, K, H): the storage itself, or gathered by the table."""
    return storage if kind == "contiguous" else storage[gather]


def visible(lengths, n, t):
    """Bool (B, 1, n, t): new query i of sequence b sees key j iff j <= lengths[b] + i (traceable)."""
    limit = lengths[:, None] + jnp.arange(n)  # (B, n)
    return (jnp.arange(t)[None, None, :] <= limit[:, :, None])[:, None]  # (B, 1, n, t)


def storage_shape(kind, batch, max_len, num_slots, kv_heads, head_dim):
    return (batch, max_len, kv_heads, head_dim) if kind == "contiguous" else (num_slots, kv_heads, head_dim)


class CacheView:
    """A cache's arrays inside a trace: `update` rebinds this layer's storage functionally.

    Layers use it exactly as they use `JaxKVCache` (``update`` then ``mask``), so one forward pass
    serves the eager handle, the jitted step and `generate`'s loop.
    """

    def __init__(self, k, v, lengths, slots, gather, kind):
        self.k, self.v = list(k), list(v)
        self.lengths, self.slots, self.gather, self.kind = lengths, slots, gather, kind

    def update(self, layer, k, v):
        self.k[layer] = write(self.k[layer], k, self.lengths, self.slots, self.kind)
        self.v[layer] = write(self.v[layer], v, self.lengths, self.slots, self.kind)
        return read(self.k[layer], self.gather, self.kind), read(self.v[layer], self.gather, self.kind)

    def mask(self, n, t):
        return visible(self.lengths, n, t)


@partial(jax.jit, static_argnames="kind")
def _update(k_store, v_store, k, v, lengths, slots, gather, *, kind):
    view = CacheView([k_store], [v_store], lengths, slots, gather, kind)
    k_all, v_all = view.update(0, k, v)
    return view.k[0], view.v[0], k_all, v_all


class JaxKVCache(SlotMapCache):
    def __init__(self, config: TransformerConfig, slot_map: SlotMap, dtype: str) -> None:
        self.map = slot_map
        self.kind = slot_map.kind
        self.batch, self.max_len = slot_map.batch, slot_map.max_len
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.dtype = _DTYPES[dtype]
        shape = storage_shape(self.kind, self.batch, self.max_len, slot_map.num_slots, self.n_kv_heads, self.head_dim)
        self.k = [jnp.zeros(shape, self.dtype) for _ in range(self.n_layers)]
        self.v = [jnp.zeros(shape, self.dtype) for _ in range(self.n_layers)]
        self._step: tuple[Any, Any, Any] | None = None

    def reserve(self, n: int, /) -> None:
        self.map.reserve(n)
        self._step = None

    def indices(self) -> tuple[Any, Any, Any]:
        """(lengths (B,), slots (B, n) or None, gather (B, max_len) or None) for the reserved step."""
        if self._step is None:
            lengths = jnp.asarray(self.map.lengths(), jnp.int32)
            if self.kind == "contiguous":
                self._step = (lengths, None, None)
            else:
                slots = jnp.asarray(self.map.slots(), jnp.int32)
                self._step = (lengths, slots, jnp.asarray(self.map.gather(self.max_len), jnp.int32))
        return self._step

    def view(self) -> CacheView:
        return CacheView(self.k, self.v, *self.indices(), self.kind)

    def rebind(self, k: list[Any], v: list[Any]) -> None:
        self.k, self.v = list(k), list(v)

    def update(self, layer: int, k: Any, v: Any, /) -> tuple[Any, Any]:
        fn = "kv_cache.update"
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"{fn}: layer must be in [0, {self.n_layers}), got {layer}")
        n = self.map.pending
        want = (self.batch, n, self.n_kv_heads, self.head_dim)
        checks.check_same_shape(fn, "k", k.shape, want, f"(B, n, K, H) for the {n} reserved tokens")
        checks.check_same_shape(fn, "v", v.shape, want, "k")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"{fn}: k and v have dtypes {k.dtype}, {v.dtype}; the cache stores {self.dtype}")
        self.k[layer], self.v[layer], k_all, v_all = _update(
            self.k[layer], self.v[layer], k, v, *self.indices(), kind=self.kind
        )
        return k_all, v_all

    def mask(self, n: int, t: int) -> Any:
        return jnp.asarray(visible_mask(self.lengths(), n, t))

    def advance(self, n: int, /) -> None:
        self.map.advance(n)
        self._step = None

    def reset(self) -> None:
        self.map.reset()
        self._step = None

    def __repr__(self) -> str:
        lengths = self.lengths().tolist()
        return f"<jax {self.kind} KV cache: batch {self.batch}, max_len {self.max_len}, lengths {lengths}>"


def kv_cache(config, batch, max_len, /, *, kind="contiguous", block_size=16, num_blocks=None, dtype="float32"):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"kv_cache: config must be a TransformerConfig, got {type(config).__name__}")
    checks.check_choice("kv_cache", "dtype", dtype, tuple(_DTYPES))
    max_len = checks.check_positive_int("kv_cache", "max_len", max_len)
    if max_len > config.max_seq_len:
        raise ValueError(f"kv_cache: max_len = {max_len} is past the config's max_seq_len = {config.max_seq_len}")
    slot_map = make_slot_map(kind, batch, max_len, block_size=block_size, num_blocks=num_blocks)
    return JaxKVCache(config, slot_map, dtype)
