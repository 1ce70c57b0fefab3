"""The forward pass of `tensorglot.layers.Layers` on validated inputs: the backend's kernels composed
into the transformer, with no check left to make (each public method of `Layers` has made them once).

One forward pass serves every architecture `TransformerConfig` describes (norm placement and kind,
biases, QK-norm, sliding windows and per-layer RoPE θ, softcaps, embedding scale, learned positions).
Kernels run through the front ends' dtype rule (`FrontEnd._run`: half precision computed in float32,
cast back); every other array operation comes from the inputs' namespace. A `_Pass` carries what one
call settled: the params, their dtype, the RoPE table of each layer (computed once per config), the
positions, the cache, the masks of a cached step (made by the first layer of each window, shared by the
rest) and, for `tensorglot.training`, the tape of what the backward pass needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .cache import KVCache, visible_mask
from .encodings import frequency_table, yarn_attention_factor
from .frontend import HALF, FrontEnd, index_ids, shape
from .kernels import GATES, device, namespace
from .param_layout import GATED, attention_shapes, block_norms, mlp_shapes
from .params import TransformerConfig
from .slot_map import row_groups

Array = Any
#: The mask of a cached step whose sequences all hold the same length: plain bottom-right causal.
_CAUSAL = object()


@lru_cache(maxsize=64)
def _rope_tables(config: TransformerConfig) -> tuple[tuple[np.ndarray, float, str, int], ...]:
    """Per layer (inv_freq float32 (r/2,), mscale, style, r): what the rope kernel takes, once per config."""
    r = config.rotary_dim or config.head_dim
    thetas = config.rope_thetas or (config.rope_theta,) * config.n_layers
    tables = {}
    for theta in set(thetas):
        inv_freq = frequency_table(r, theta=theta, scaling=config.rope_scaling).astype(np.float32)
        tables[theta] = (inv_freq, yarn_attention_factor(config.rope_scaling), config.rope_style, r)
    return tuple(tables[theta] for theta in thetas)


@dataclass
class _Pass:
    """One forward pass's settled inputs: the validated params, their dtype, the RoPE tables and positions,
    the cache, the masks of a cached step (by window, made by the first layer) and, for the backward, a tape."""

    params: dict[str, Array]
    dtype: str
    config: TransformerConfig
    xp: Any
    positions: Array | None = None  # RoPE (or learned) positions, (S,) or (B, S); None is arange(S)
    cache: KVCache | None = None
    mask: dict[tuple[int | None, int | None], Any] | None = None  # by (window, row group)
    groups: list[tuple[np.ndarray, Array]] | None = None  # a cached step's row groups, host and device
    back: Array | None = None  # the groups' rows concatenated, put back in row order
    tape: list[dict[str, Array]] | None = None
    rope: tuple[tuple[np.ndarray, float, str, int], ...] = field(init=False)
    folded: dict[str, list[Array]] = field(init=False, default_factory=dict)  # by layer prefix, see `_mlp`

    def __post_init__(self) -> None:
        self.rope = _rope_tables(self.config)

    def next_step(self) -> None:
        """Forget one cached step's positions, masks and row groups: the next step makes its own."""
        self.positions = self.mask = self.groups = self.back = None


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
        x = self._embed(tokens, p)  # (B, S, D)
        for i in range(c.n_layers):
            x = self._block(x, p, i)
        n = self._norm(x, p, "norm")
        logits = self._linear(n, _head(w, c), None, p)  # (B, S, V)
        t = None
        if c.final_softcap is not None:
            t = p.xp.tanh(logits / c.final_softcap)
            logits = c.final_softcap * t
        if p.tape is not None:
            p.tape.append({"x": x, "n": n, "t": t})
        return logits

    def _embed(self, tokens: Array, p: _Pass) -> Array:
        c = p.config
        x = self._k.embedding(p.params["embed"], index_ids(tokens))  # (B, S, D)
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        if c.position == "learned":
            x = x + self._k.embedding(p.params["pos_embed"], self._positions_of(tokens, p))  # (S|B·S, D)
        return x

    def _positions_of(self, tokens: Array, p: _Pass) -> Array:
        """The positions the tokens take: ``p.positions`` or arange(S), as ints where the tokens are."""
        return _on_device(np.arange(shape(tokens)[1]), tokens) if p.positions is None else p.positions

    def _block(self, x: Array, p: _Pass, layer: int) -> Array:
        """One block, its norms where ``config.norm_placement`` puts them (see `TransformerConfig`)."""
        pre = f"layers.{layer}."
        attn_norm, post_attn_norm, mlp_norm, post_mlp_norm = block_norms(p.config)
        saved = None if p.tape is None else {"x": x}
        a = x if attn_norm is None else self._norm(x, p, pre + attn_norm)
        o = self._attention(a, p, layer, saved)
        if post_attn_norm is not None:
            if saved is not None:
                saved["o"] = o
            o = self._norm(o, p, pre + post_attn_norm)
        h = x + o
        source = x if p.config.norm_placement == "parallel" else h
        m = source if mlp_norm is None else self._norm(source, p, pre + mlp_norm)
        z = self._mlp(m, p, layer)
        if post_mlp_norm is not None:
            if saved is not None:
                saved["z"] = z
            z = self._norm(z, p, pre + post_mlp_norm)
        if saved is not None:
            saved.update(a=a, h=h, m=m)
            p.tape.append(saved)  # type: ignore[union-attr]
        return h + z

    def _attention(self, x: Array, p: _Pass, layer: int, saved: dict | None = None) -> Array:
        xp, c, w = p.xp, p.config, p.params
        pre = f"layers.{layer}."
        B, S, D = shape(x)
        N, K, H = c.n_heads, c.n_kv_heads, c.head_dim
        q_lin, k_lin = self._project(x, p, pre, "q", N), self._project(x, p, pre, "k", K)  # (B, S, N|K·H)
        v = xp.reshape(self._project(x, p, pre, "v", K), (B, S, K, H))
        q, k = self._qk_norm(q_lin, p, pre + "q_norm", N), self._qk_norm(k_lin, p, pre + "k_norm", K)
        q, k = self._rope_qk(q, k, p, layer)  # never v
        scale = c.attn_scale or 1.0 / math.sqrt(H)
        causal, mask = True, None
        if p.cache is None:
            causal, mask, k_all, v_all = True, self._window_mask(S, c.window(layer), x), k, v
            y = self._attend(p, q, k_all, v_all, causal, mask, scale)
        elif saved is None and len(self._groups(p, S, x)) > 1:
            y = self._grouped_attention(q, k, v, p, layer, scale)
        else:
            k_all, v_all = p.cache.update(layer, k, v)  # (B, T, K, H), keys stored after RoPE
            causal, mask = self._step_mask(p, c.window(layer), S, shape(k_all)[1], x)
            y = self._attend(p, q, k_all, v_all, causal, mask, scale)
        y = xp.reshape(y, (B, S, N * H))  # (B, S, N·H)
        if saved is not None:
            saved.update(q=q, k=k, v=v, y=y, causal=causal, mask=mask)
            if c.qk_norm is not None:  # the norm's backward reads its input; else the tape keeps no more
                saved.update(q_lin=q_lin, k_lin=k_lin)
        wo = xp.reshape(w[pre + "wo"], (N * H, D))
        return self._linear(y, wo, w.get(pre + "bo"), p)  # (B, S, D)

    def _groups(self, p: _Pass, S: int, like: Array) -> list[tuple[np.ndarray, Array]]:
        """A cached step's rows in groups by length (`row_groups`), made by the first layer: a group is
        read and attended only as far as its own longest sequence."""
        if p.groups is None:
            assert p.cache is not None
            lengths = p.cache.lengths()
            traced = not isinstance(lengths, np.ndarray)  # JAX's compiled step: one group
            rows = [np.arange(shape(lengths)[0])] if traced else row_groups(lengths, S)
            split = len(rows) > 1  # only a split reads by group: then its rows and the way back go to the device
            p.groups = [(r, _on_device(r, like) if split else None) for r in rows]
            if split:
                p.back = _on_device(np.argsort(np.concatenate(rows)), like)
        return p.groups

    def _grouped_attention(self, q: Array, k: Array, v: Array, p: _Pass, layer: int, scale: float) -> Array:
        """Attention of a cached step, group by group (`_groups`): each group's queries over its own rows'
        keys, (R, T_g, K, H), then every row's output put back in row order: (B, S, N, H)."""
        assert p.cache is not None and p.groups is not None
        xp, S, window = p.xp, shape(q)[1], p.config.window(layer)
        p.cache.write(layer, k, v)
        ys = []
        for g, (rows, at) in enumerate(p.groups):
            k_g, v_g = p.cache.read(layer, rows)  # (R, T_g, K, H)
            causal, mask = self._step_mask(p, window, S, shape(k_g)[1], q, g)
            q_g = xp.take(q, at, axis=0)  # (R, S, N, H)
            ys.append(self._attend(p, q_g, k_g, v_g, causal, mask, scale))
        return xp.take(xp.concat(ys, axis=0), p.back, axis=0)

    def _attend(self, p: _Pass, q: Array, k: Array, v: Array, causal: bool, mask: Any, scale: float) -> Array:
        return self._run(self._k.attention, p.dtype, (q, k, v), causal, mask, scale, *self._softcap(p))

    def _softcap(self, p: _Pass) -> tuple[float, ...]:
        """The attention kernel's softcap option, passed only when the config sets one."""
        cap = p.config.attn_softcap
        return () if cap is None else (cap,)

    def _project(self, x: Array, p: _Pass, pre: str, name: str, heads: int) -> Array:
        """x · w{name} (+ b{name}): (B, S, heads·H)."""
        xp, H = p.xp, p.config.head_dim
        w, b = p.params[pre + "w" + name], p.params.get(pre + "b" + name)
        b = None if b is None else xp.reshape(b, (heads * H,))
        return self._linear(x, xp.reshape(w, (shape(x)[-1], heads * H)), b, p)

    def _qk_norm(self, x: Array, p: _Pass, name: str, heads: int) -> Array:
        """(B, S, heads, H): a projection, RMS-normalised over each head or over all of it (``qk_norm``)."""
        xp, c = p.xp, p.config
        B, S, _ = shape(x)
        if c.qk_norm == "projection":
            x = self._rms(x, p.params[name], p)
        x = xp.reshape(x, (B, S, heads, c.head_dim))  # (B, S, heads, H)
        return self._rms(x, p.params[name], p) if c.qk_norm == "head" else x

    def _window_mask(self, S: int, window: int | None, like: Array) -> Array | None:
        """(1, 1, S, S) bool of a sliding window over a whole sequence (the kernel's causal does the rest)."""
        if window is None:
            return None
        i = np.arange(S)
        return _on_device((i[None, :] > i[:, None] - window)[None, None], like)  # (1, 1, S, S)

    def _step_mask(
        self, p: _Pass, window: int | None, S: int, T: int, like: Array, group: int | None = None
    ) -> tuple[bool, Any]:
        """(causal, mask) of a cached step (of row group ``group``'s rows): `visible_mask`, one per window
        and group for every layer of the step, or plain bottom-right causal (no mask) when every sequence
        holds T − S tokens and there is no window."""
        assert p.cache is not None
        if p.mask is None:
            p.mask = {}
        key = (window, group)
        if key not in p.mask:
            lengths = p.cache.lengths()
            if group is not None:
                assert p.groups is not None
                lengths = lengths[p.groups[group][0]]
            same = isinstance(lengths, np.ndarray) and lengths.min() == lengths.max() == T - S
            if same and window is None:
                p.mask[key] = _CAUSAL
            else:
                p.mask[key] = _on_device(visible_mask(lengths, S, T, window=window), like)  # (B, 1, S, T)
        mask = p.mask[key]
        return (True, None) if mask is _CAUSAL else (False, mask)

    def _mlp(self, x: Array, p: _Pass, layer: int) -> Array:
        c, xp = p.config, p.xp
        pre, act = f"layers.{layer}.", c.activation
        weights = [p.params[pre + n] for n in mlp_names(c) if n.startswith("w")]
        if c.mlp_bias:  # the folded weights are made once per pass, not once per decoding step
            x, weights, b_out = _fold_biases(x, weights, p.params, pre, c, xp, p.folded.get(pre))
            p.folded[pre] = weights
        if act in GATED:
            out = self._run(self._k.gated_mlp, p.dtype, (x, *weights), GATES[act])
        else:
            out = self._run(self._k.mlp, p.dtype, (x, *weights), act)
        return out + b_out if c.mlp_bias else out

    def _linear(self, x: Array, w: Array, b: Array | None, p: _Pass) -> Array:
        return self._run(self._k.linear, p.dtype, (x, w, b))

    def _norm(self, x: Array, p: _Pass, name: str) -> Array:
        """The norm ``name`` of the config's kind (its bias ``name_bias`` with ``norm_bias``)."""
        if p.config.norm_kind == "layer":
            bias = p.params.get(name + "_bias")
            return self._run(self._k.layer_norm, p.dtype, (x, p.params[name], bias), p.config.norm_eps)
        return self._rms(x, p.params[name], p)

    def _rms(self, x: Array, weight: Array, p: _Pass) -> Array:
        offset = float(p.config.norm_offset)  # Gemma's 1 + w: the product taken in float32, then cast
        round_to = p.dtype if p.dtype in HALF and not offset else None  # else Llama's: rounded, then × w
        return self._run(self._k.rms_norm, p.dtype, (x, weight), p.config.norm_eps, round_to, offset)

    def _rope_qk(self, q: Array, k: Array, p: _Pass, layer: int) -> tuple[Array, Array]:
        """q and k rotated in one kernel call over their heads side by side (RoPE acts on each head alone, so
        the bits are those of two calls): a decoding step is mostly per-op cost, and this halves RoPE's."""
        if p.config.position != "rope":
            return q, k
        N = shape(q)[2]
        qk = self._rope(p.xp.concat([q, k], axis=2), p, 1.0, layer)  # (B, S, N + K, H)
        return qk[:, :, :N, :], qk[:, :, N:, :]

    def _rope(self, x: Array, p: _Pass, sign: float, layer: int = 0) -> Array:
        if p.config.position != "rope":
            return x
        inv_freq, mscale, style, r = p.rope[layer]
        return self._run(self._k.rope, p.dtype, (x,), p.positions, inv_freq, mscale, sign, style, r)


def _fold_biases(
    x: Array, weights: list, params: Mapping, pre: str, c: TransformerConfig, xp: Any, folded: list | None = None
) -> Any:
    """The fused MLP kernels take no biases: a column of ones appended to x carries the input biases
    as one more row of each input weight, (D + 1, F); the output bias is added after. Returns the
    augmented x, the weights (``folded``, the weights an earlier call returned, when given) and the output bias."""
    ones = xp.ones((*shape(x)[:-1], 1), dtype=x.dtype, device=device(x))
    xa = xp.concat([x, ones], axis=-1)  # (B, S, D + 1)
    gated = c.activation in GATED
    if folded is None:
        *inputs, out = weights
        biases = ("b_gate", "b_up") if gated else ("b_in",)
        rows = [xp.concat([w, params[pre + b][None, :]], axis=0) for w, b in zip(inputs, biases)]  # (D + 1, F)
        folded = [*rows, out]
    return xa, folded, params[pre + ("b_down" if gated else "b_out")]


def _on_device(host: np.ndarray, like: Array) -> Array:
    """A host array (a mask, positions) as an array of ``like``'s library on its device."""
    return namespace(like).asarray(host, device=device(like))


def attention_names(config: TransformerConfig) -> tuple[str, ...]:
    """One layer's attention parameters (without the ``layers.{i}.`` prefix)."""
    return tuple(attention_shapes(config))


def mlp_names(config: TransformerConfig) -> tuple[str, ...]:
    """One layer's MLP parameters (without the prefix): the weights, then the biases."""
    return tuple(mlp_shapes(config))


def _head(params: Mapping[str, Array], config: TransformerConfig) -> Array:
    return params["embed"].T if config.tie_embeddings else params["lm_head"]  # (D, V)
