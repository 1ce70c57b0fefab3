"""The forward pass of `tensorglot.layers.Layers` on validated inputs: the backend's kernels composed
into the transformer, with no check left to make (each public method of `Layers` has made them once).

Kernels run through the front ends' dtype rule (`FrontEnd._run`: half precision computed in float32,
cast back); every other array operation comes from the inputs' namespace. A `_Pass` carries what one
call settled: the params, their dtype, the RoPE table of the config (computed once per config), the
positions, the cache, the mask of a cached step (made by its first layer, shared by the rest) and,
for `tensorglot.training`, the tape of what the backward pass needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from .cache import KVCache, visible_mask
from .encodings import frequency_table, yarn_attention_factor
from .frontend import HALF, FrontEnd, index_ids, shape
from .params import TransformerConfig

Array = Any
#: The mask of a cached step whose sequences all hold the same length: plain bottom-right causal.
_CAUSAL = object()

_ATTENTION = ("wq", "wk", "wv", "wo")
_MLP = {"swiglu": ("w_gate", "w_up", "w_down")}  # every other activation: ("w_in", "w_out")


@lru_cache(maxsize=64)
def _rope_table(config: TransformerConfig) -> tuple[np.ndarray, float, str, int]:
    """(inv_freq float32 (r/2,), mscale, style, r): what the rope kernel takes, once per config."""
    r = config.rotary_dim or config.head_dim
    inv_freq = frequency_table(r, theta=config.rope_theta, scaling=config.rope_scaling).astype(np.float32)
    return inv_freq, yarn_attention_factor(config.rope_scaling), config.rope_style, r


@dataclass
class _Pass:
    """One forward pass's settled inputs: the validated params, their dtype, the RoPE table and positions,
    the cache, the mask of a cached step (made by its first layer) and, for the backward, a tape."""

    params: dict[str, Array]
    dtype: str
    config: TransformerConfig
    xp: Any
    positions: Array | None = None  # RoPE positions, (S,) or (B, S); None is arange(S)
    cache: KVCache | None = None
    mask: Array | None = None
    tape: list[dict[str, Array]] | None = None
    rope: tuple[np.ndarray, float, str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rope = _rope_table(self.config)


class Forward(FrontEnd):
    """The forward pass; `tensorglot.layers.Layers` adds the public methods and their validation."""

    def _cache_positions(self, p: _Pass, S: int) -> Array:
        assert p.cache is not None
        pos = p.cache.lengths()[:, None] + np.arange(S)  # (B, S): each sequence continues where it is
        return _on_device(pos, next(iter(p.params.values())))

    def _transformer(self, tokens: Array, p: _Pass) -> Array:
        """`transformer` on validated inputs: the cache's reserve and advance around the forward pass."""
        if p.cache is None:
            return self._forward(tokens, p)
        S = shape(tokens)[1]
        if p.positions is None:
            p.positions = self._cache_positions(p, S)
        p.cache.reserve(S)  # raises past capacity before anything is written
        try:
            logits = self._forward(tokens, p)
        except BaseException:
            p.cache.cancel()  # a failed call changes no cache
            raise
        p.cache.advance(S)
        return logits

    def _forward(self, tokens: Array, p: _Pass) -> Array:
        c, w = p.config, p.params
        x = self._k.embedding(w["embed"], index_ids(tokens))  # (B, S, D)
        for i in range(c.n_layers):
            x = self._block(x, p, i)
        n = self._norm(x, w["norm"], p)
        if p.tape is not None:
            p.tape.append({"x": x, "n": n})
        return self._linear(n, _head(w, c), p)  # (B, S, V)

    def _block(self, x: Array, p: _Pass, layer: int) -> Array:
        pre = f"layers.{layer}."
        a = self._norm(x, p.params[pre + "attn_norm"], p)
        saved = None if p.tape is None else {"x": x, "a": a}
        h = x + self._attention(a, p, layer, saved)
        m = self._norm(h, p.params[pre + "mlp_norm"], p)
        if saved is not None:
            saved.update(h=h, m=m)
            p.tape.append(saved)  # type: ignore[union-attr]
        return h + self._mlp(m, p, layer)

    def _attention(self, x: Array, p: _Pass, layer: int, saved: dict | None = None) -> Array:
        xp, c = p.xp, p.config
        pre = f"layers.{layer}."
        B, S, D = shape(x)
        N, K, H = c.n_heads, c.n_kv_heads, c.head_dim
        q = xp.reshape(self._linear(x, xp.reshape(p.params[pre + "wq"], (D, N * H)), p), (B, S, N, H))
        k = xp.reshape(self._linear(x, xp.reshape(p.params[pre + "wk"], (D, K * H)), p), (B, S, K, H))
        v = xp.reshape(self._linear(x, xp.reshape(p.params[pre + "wv"], (D, K * H)), p), (B, S, K, H))
        q, k = self._rope(q, p, 1.0), self._rope(k, p, 1.0)  # never v
        scale = 1.0 / math.sqrt(H)
        if p.cache is None:
            y = self._run(self._k.attention, p.dtype, (q, k, v), True, None, scale)
        else:
            k_all, v_all = p.cache.update(layer, k, v)  # (B, T, K, H), keys stored after RoPE
            if p.mask is None:  # one mask serves every layer of the step
                p.mask = self._step_mask(p.cache.lengths(), S, shape(k_all)[1], x)
            causal, mask = (True, None) if p.mask is _CAUSAL else (False, p.mask)
            y = self._run(self._k.attention, p.dtype, (q, k_all, v_all), causal, mask, scale)
        y = xp.reshape(y, (B, S, N * H))  # (B, S, N·H)
        if saved is not None:
            saved.update(q=q, k=k, v=v, y=y)
        return self._linear(y, xp.reshape(p.params[pre + "wo"], (N * H, D)), p)  # (B, S, D)

    def _step_mask(self, lengths: Array, S: int, T: int, like: Array) -> Any:
        """`visible_mask` of a cached step, or `_CAUSAL` when every sequence holds T − S tokens: then key
        j is visible to query i iff j <= i + T − S, bottom-right causal, which the kernel does maskless."""
        if isinstance(lengths, np.ndarray) and lengths.min() == lengths.max() == T - S:
            return _CAUSAL
        return _on_device(visible_mask(lengths, S, T), like)  # (B, 1, S, T)

    def _mlp(self, x: Array, p: _Pass, layer: int) -> Array:
        pre, act = f"layers.{layer}.", p.config.activation
        weights = tuple(p.params[pre + n] for n in _mlp_names(p.config))
        if act == "swiglu":
            return self._run(self._k.swiglu, p.dtype, (x, *weights))
        return self._run(self._k.mlp, p.dtype, (x, *weights), act)

    def _linear(self, x: Array, w: Array, p: _Pass) -> Array:
        return self._run(self._k.linear, p.dtype, (x, w, None))

    def _norm(self, x: Array, weight: Array, p: _Pass) -> Array:
        round_to = p.dtype if p.dtype in HALF else None
        return self._run(self._k.rms_norm, p.dtype, (x, weight), p.config.norm_eps, round_to)

    def _rope(self, x: Array, p: _Pass, sign: float) -> Array:
        inv_freq, mscale, style, r = p.rope
        return self._run(self._k.rope, p.dtype, (x,), p.positions, inv_freq, mscale, sign, style, r)


def _on_device(host: np.ndarray, like: Array) -> Array:
    """A host array (a mask, positions) as an array of ``like``'s library on its device."""
    return array_namespace(like).asarray(host, device=device(like))


def _mlp_names(config: TransformerConfig) -> tuple[str, ...]:
    return _MLP.get(config.activation, ("w_in", "w_out"))


def _head(params: Mapping[str, Array], config: TransformerConfig) -> Array:
    return params["embed"].T if config.tie_embeddings else params["lm_head"]  # (D, V)
