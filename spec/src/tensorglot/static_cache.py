"""A `tensorglot.cache.KVCache` as a compiled program sees it: static shapes, traced lengths and storage.

A compiled step cannot run the cache's host bookkeeping (reserve, advance, the slot map), and it must
have one shape for every step. So the host reserves first, and the step gets the slot of every position
of every sequence, ``table`` (B, L) from the spec's slot map, and reads all L keys of a sequence, the
unwritten ones masked by `visible_mask`: a step compiles once per token count. Written against the
array API (the inputs' namespace), for any backend that compiles its steps (JAX's `generate` today).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from .cache import kv_head_inner, kv_head_major
from .frontend import shape


class StaticCache:
    """``write`` is the backend's ``cache_write`` kernel; ``k``, ``v`` one storage array per layer,
    (K, slots, H) as the `KVCache`'s; ``lengths`` (B,) the tokens each sequence holds."""

    def __init__(self, write: Any, kind: str, table: Any, k: list, v: list, lengths: Any) -> None:
        self.write, self.kind, self.table = write, kind, table  # table (B, L): the slot of each position
        self.k, self.v, self._lengths = list(k), list(v), lengths

    def lengths(self) -> Any:
        return self._lengths

    def reserve(self, n: int, /) -> None:
        pass  # every slot the steps write was reserved when the table was made

    def advance(self, n: int, /) -> None:
        self._lengths = self._lengths + n

    def update(self, layer: int, k: Any, v: Any, /) -> tuple[Any, Any]:
        """Write this step's (B, n, K, H) keys and values at their slots; every position's, (B, L, K, H)."""
        xp = array_namespace(k)
        B, n, K, H = shape(k)
        L = shape(self.table)[1]
        positions = self._lengths[:, None] + xp.arange(n, dtype=self._lengths.dtype)  # (B, n)
        slots = xp.reshape(xp.take_along_axis(self.table, positions, axis=1), (-1,))  # (B·n,)
        rows = (kv_head_major(xp, xp.reshape(x, (B * n, K, H))) for x in (k, v))  # (K, B·n, H)
        self.k[layer], self.v[layer] = (self.write(s[layer], slots, r) for s, r in zip((self.k, self.v), rows))
        if self.kind == "contiguous":  # slot b·L + p: a reshape reads it
            kv = (xp.reshape(s[layer], (K, B, L, H)) for s in (self.k, self.v))
        else:
            every = xp.reshape(self.table, (-1,))
            kv = (xp.reshape(xp.take(s[layer], every, axis=1), (K, B, L, H)) for s in (self.k, self.v))
        k_all, v_all = (kv_head_inner(xp, x) for x in kv)  # (B, L, K, H)
        return k_all, v_all
