"""NumPy KV caches: see the spec, `tensorglot.cache`. Storage per layer is (slots, K, H); the spec's
`SlotMap`/`PagedSlotMap` say which slot each token lives in."""

from __future__ import annotations

import numpy as np

from tensorglot import checks
from tensorglot.cache import SlotMap, SlotMapCache, make_slot_map
from tensorglot.params import TransformerConfig

_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


class NumpyKVCache(SlotMapCache):
    def __init__(self, config: TransformerConfig, slot_map: SlotMap, dtype: str) -> None:
        self.map = slot_map
        self.kind = slot_map.kind
        self.batch, self.max_len = slot_map.batch, slot_map.max_len
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.dtype = np.dtype(_DTYPES[dtype])
        shape = (slot_map.num_slots, self.n_kv_heads, self.head_dim)  # (slots, K, H)
        self.k = [np.zeros(shape, self.dtype) for _ in range(self.n_layers)]
        self.v = [np.zeros(shape, self.dtype) for _ in range(self.n_layers)]
        self._slots: np.ndarray | None = None

    def reserve(self, n: int, /) -> None:
        self.map.reserve(n)
        self._slots = None

    def update(self, layer: int, k: np.ndarray, v: np.ndarray, /) -> tuple[np.ndarray, np.ndarray]:
        fn = "kv_cache.update"
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"{fn}: layer must be in [0, {self.n_layers}), got {layer}")
        n = self.map.pending
        want = (self.batch, n, self.n_kv_heads, self.head_dim)
        checks.check_same_shape(fn, "k", k.shape, want, f"(B, n, K, H) for the {n} reserved tokens")
        checks.check_same_shape(fn, "v", v.shape, want, "k")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"{fn}: k and v have dtypes {k.dtype}, {v.dtype}; the cache stores {self.dtype}")
        if self._slots is None:
            self._slots = self.map.slots()  # (B, n), the same for every layer of a step
        self.k[layer][self._slots] = k
        self.v[layer][self._slots] = v
        T = self.map.visible()
        if self.kind == "contiguous":  # a view, no copy: slot b·max_len + p is [b, p]
            view = (self.batch, self.max_len, self.n_kv_heads, self.head_dim)
            return self.k[layer].reshape(view)[:, :T], self.v[layer].reshape(view)[:, :T]
        index = self.map.gather(T)  # (B, T)
        return self.k[layer][index], self.v[layer][index]  # (B, T, K, H)

    def advance(self, n: int, /) -> None:
        self.map.advance(n)
        self._slots = None

    def reset(self) -> None:
        self.map.reset()
        self._slots = None

    def __repr__(self) -> str:
        lengths = self.lengths().tolist()
        return f"<numpy {self.kind} KV cache: batch {self.batch}, max_len {self.max_len}, lengths {lengths}>"


def kv_cache(config, batch, max_len, /, *, kind="contiguous", block_size=16, num_blocks=None, dtype="float32"):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"kv_cache: config must be a TransformerConfig, got {type(config).__name__}")
    checks.check_choice("kv_cache", "dtype", dtype, tuple(_DTYPES))
    max_len = checks.check_positive_int("kv_cache", "max_len", max_len)
    if max_len > config.max_seq_len:
        raise ValueError(f"kv_cache: max_len = {max_len} is past the config's max_seq_len = {config.max_seq_len}")
    slot_map = make_slot_map(kind, batch, max_len, block_size=block_size, num_blocks=num_blocks)
    return NumpyKVCache(config, slot_map, dtype)
