"""PyTorch KV caches: see the spec, `tensorglot.cache`. Storage per layer is a (slots, K, H) tensor;
the spec's `SlotMap`/`PagedSlotMap` say which slot each token lives in.

Storage is allocated on the first `update`, on the device of the keys written, so a cache follows the
model wherever it runs. The cache is for inference: it stores detached keys and values, so no autograd
graph spans steps.
"""

from __future__ import annotations

import numpy as np
import torch

from tensorglot import checks
from tensorglot.cache import SlotMap, SlotMapCache, make_slot_map
from tensorglot.params import TransformerConfig

from ._common import DTYPES, dtype_name

FLOATS = ("float64", "float32", "float16", "bfloat16")


class TorchKVCache(SlotMapCache):
    def __init__(self, config: TransformerConfig, slot_map: SlotMap, dtype: str) -> None:
        self.map = slot_map
        self.kind = slot_map.kind
        self.batch, self.max_len = slot_map.batch, slot_map.max_len
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.dtype = DTYPES[dtype]
        self.device: torch.device | None = None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._slots: torch.Tensor | None = None
        self._gather: torch.Tensor | None = None

    def _index(self, index: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(index).to(self.device)

    def reserve(self, n: int, /) -> None:
        self.map.reserve(n)
        self._slots = self._gather = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor]:
        fn = "kv_cache.update"
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"{fn}: layer must be in [0, {self.n_layers}), got {layer}")
        n = self.map.pending
        want = (self.batch, n, self.n_kv_heads, self.head_dim)
        checks.check_same_shape(fn, "k", tuple(k.shape), want, f"(B, n, K, H) for the {n} reserved tokens")
        checks.check_same_shape(fn, "v", tuple(v.shape), want, "k")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(
                f"{fn}: k and v have dtypes {dtype_name(k)}, {dtype_name(v)}; the cache stores "
                f"{str(self.dtype).removeprefix('torch.')}"
            )
        if self.device is None:
            self.device = k.device
            shape = (self.map.num_slots, self.n_kv_heads, self.head_dim)  # (slots, K, H)
            self.k = [torch.zeros(shape, dtype=self.dtype, device=k.device) for _ in range(self.n_layers)]
            self.v = [torch.zeros(shape, dtype=self.dtype, device=k.device) for _ in range(self.n_layers)]
        if k.device != self.device or v.device != self.device:
            raise TypeError(f"{fn}: k and v are on {k.device}, {v.device}; the cache is on {self.device}")
        T = self.map.visible()
        if self._slots is None:  # the same for every layer of a step
            self._slots = self._index(self.map.slots()).reshape(-1)  # (B·n,)
            self._gather = None if self.kind == "contiguous" else self._index(self.map.gather(T))  # (B, T)
        self.k[layer][self._slots] = k.detach().reshape(-1, self.n_kv_heads, self.head_dim)
        self.v[layer][self._slots] = v.detach().reshape(-1, self.n_kv_heads, self.head_dim)
        if self._gather is None:  # contiguous: a view, no copy; slot b·max_len + p is [b, p]
            view = (self.batch, self.max_len, self.n_kv_heads, self.head_dim)
            return self.k[layer].view(view)[:, :T], self.v[layer].view(view)[:, :T]
        return self.k[layer][self._gather], self.v[layer][self._gather]  # (B, T, K, H)

    def advance(self, n: int, /) -> None:
        self.map.advance(n)
        self._slots = self._gather = None

    def reset(self) -> None:
        self.map.reset()
        self._slots = self._gather = None

    def __repr__(self) -> str:
        where = self.device or "(no device yet)"
        sizes = f"batch {self.batch}, max_len {self.max_len}, lengths {self.lengths().tolist()}"
        return f"<torch {self.kind} KV cache on {where}: {sizes}>"


def kv_cache(config, batch, max_len, /, *, kind="contiguous", block_size=16, num_blocks=None, dtype="float32"):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"kv_cache: config must be a TransformerConfig, got {type(config).__name__}")
    checks.check_choice("kv_cache", "dtype", dtype, FLOATS)
    max_len = checks.check_positive_int("kv_cache", "max_len", max_len)
    if max_len > config.max_seq_len:
        raise ValueError(f"kv_cache: max_len = {max_len} is past the config's max_seq_len = {config.max_seq_len}")
    slot_map = make_slot_map(kind, batch, max_len, block_size=block_size, num_blocks=num_blocks)
    return TorchKVCache(config, slot_map, dtype)
