"""The layers namespace: a decoder-only transformer as functions over a flat dict of parameters.

Parameters are the ``dict[str, array]`` of `tensorglot.params` (names and shapes there), made by
`tensorglot.init_params` and put on a backend with ``{k: be.asarray(v) for k, v in params.items()}``;
the configuration is a `tensorglot.TransformerConfig`. The functions are written once, here, as the
methods of `Layers`, and ``be.layers`` of every backend is a `Layers` bound to it: each public call
validates its inputs once (`tensorglot.params.check_params`, `check_tokens`, `tensorglot.cache.check_cache`),
then composes the backend's kernels directly (`tensorglot.kernels`), through the front ends' dtype rule
but without validating each op again. Array operations that are not kernels (reshape, concat, argmax)
come from the inputs' own namespace (``array_api_compat.array_namespace``). Shapes: B batch, S new
tokens, T keys, D d_model, N query heads, K kv heads, H head dim, V vocabulary.

The model (pinned; the defaults are Llama's, every other architecture a field of `TransformerConfig`):
  * ``transformer``: ``x = embed[tokens] · embed_scale`` (+ ``pos_embed[positions]`` when ``position``
    is ``learned``) → ``n_layers`` × `block` → ``norm(x)`` → ``logits = x @ lm_head`` (or ``x @ embed.T``
    when ``tie_embeddings``), then ``final_softcap · tanh(logits / final_softcap)`` when it is set. No
    dropout.
  * ``block`` by ``norm_placement``: ``pre`` ``h = x + attention_layer(norm(x, attn_norm))``, ``out = h +
    mlp_layer(norm(h, mlp_norm))``; ``sandwich`` also normalises each sublayer's output (``post_attn_norm``,
    ``post_mlp_norm``) before its residual add; ``post`` only does that; ``parallel`` ``out = x +
    attention_layer(norm(x, attn_norm)) + mlp_layer(norm(x, mlp_norm))``. ``norm`` is `Ops.rms_norm`
    (weight ``norm_offset + w``) or `Ops.layer_norm` (with its bias when ``norm_bias``), eps ``norm_eps``.
  * ``attention_layer``: ``q = einsum("bsd,dnh->bsnh", x, wq) (+ bq)``, k and v likewise with wk, wv (K
    heads); the QK-norm (RMS, per head or over the projection) on q and k; RoPE (``config.rope_*``, the
    layer's θ, at the tokens' positions) on q and k, never on v, when ``position`` is ``rope``;
    `Ops.attention` with query head h reading kv head h // (N // K), causal (bottom-right), scale
    ``attn_scale`` or 1/√H, and the layer's sliding window (key j visible to query i iff i − W < j);
    then ``einsum("bsnh,nhd->bsd", y, wo) (+ bo)``.
  * ``mlp_layer``: ``Ops.mlp(x, w_in, w_out, activation=config.activation)``, or ``Ops.swiglu(x, w_gate,
    w_up, w_down)`` when the activation is ``swiglu``; with ``mlp_bias`` the biases of each linear.
  * Positions: without a cache, ``arange(S)``; with one, sequence b's new tokens sit at
    ``cache.lengths()[b] + arange(S)``. ``positions`` overrides the positions RoPE uses (not where the
    cache writes). A position must be < ``max_seq_len``.
  * Precision: logits and every activation have the parameters' dtype; half precision is computed in
    float32 inside each op, as the ops say.

Errors: params that do not match the config (a missing, unexpected or misshapen array), tokens that are
not ints of shape (B, S), out of [0, vocab_size), or past ``max_seq_len`` raise ValueError/TypeError
naming the function and what was wrong. Token ids may have any integer dtype that holds vocab_size − 1
(so `generate`'s ids fit the prompt's dtype; uint8 holds a vocabulary of up to 256): a narrower one is
a TypeError, never a wrapped id. ``transformer``, ``generate``, ``loss`` and ``value_and_grad``
check every parameter; a layer function checks the ones it reads, so a module holding one layer's
weights can call it.

>>> import numpy as np, tensorglot
>>> cfg = tensorglot.TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
...                                    head_dim=4, d_ff=32, max_seq_len=64)
>>> params = tensorglot.init_params(cfg, seed=0, dtype="float64")
>>> layers = tensorglot.get_backend("numpy").layers
>>> layers.transformer(np.array([[1, 2, 3]]), params, cfg).shape
(1, 3, 32)
>>> out = layers.generate(params, cfg, np.array([[1, 2, 3]]), max_new_tokens=4)
>>> again = layers.generate(params, cfg, np.array([[1, 2, 3]]), max_new_tokens=4, cache=None)
>>> out.shape, bool((out == again).all())
((1, 7), True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from array_api_compat import array_namespace

from . import cache as cache_module
from . import checks
from .cache import BLOCK_SIZE, KVCache, check_cache
from .forward import Forward, _Pass, attention_names, mlp_names
from .frontend import shape
from .params import TransformerConfig, check_params, check_tokens, param_shapes

Array = Any
Params = Mapping[str, Array]


class Layers(Forward):
    """The layers of one backend: ``Layers(backend)`` is ``backend.layers``. A backend may subclass it to
    override a method for speed (JAX compiles `generate`); the conformance suite holds the override to
    the method written here."""

    def attention_layer(
        self,
        x: Array,
        params: Params,
        config: TransformerConfig,
        /,
        *,
        layer: int,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array:
        r"""Multi-head (grouped-query) self-attention of layer ``layer``, without its norm or residual.

        ``q, k, v = x·wq, x·wk, x·wv``; ``q, k = rope(q), rope(k)`` at ``positions``; with a cache, the
        rotated k and v are written to it (``cache.update``) and the queries attend over every key the
        cache holds for their sequence; ``y = attention(q, k, v, causal)``; returns ``y·wo``.

        Args:
            x: (B, S, D), already normalised.  params: the model's dict (layer ``layer``'s wq, wk, wv, wo
            are read).  layer: in [0, n_layers).  positions: (S,) or (B, S) ints, the RoPE positions.
            cache: a `KVCache` on which ``reserve(S)`` was called (`transformer` does this).
        Returns:
            (B, S, D).
        """
        names = attention_names(config)
        x, p = self._layer_inputs("attention_layer", x, params, config, layer, names, positions, cache)
        return self._attention(x, p, layer)

    def mlp_layer(self, x: Array, params: Params, config: TransformerConfig, /, *, layer: int) -> Array:
        r"""The MLP of layer ``layer``, without its norm or residual: ``mlp`` or ``swiglu`` by
        ``config.activation``.

        Args:
            x: (B, S, D), already normalised.
        Returns:
            (B, S, D).
        """
        x, p = self._layer_inputs("mlp_layer", x, params, config, layer, mlp_names(config), None, None)
        return self._mlp(x, p, layer)

    def block(
        self,
        x: Array,
        params: Params,
        config: TransformerConfig,
        /,
        *,
        layer: int,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array:
        r"""One block, its norms where ``config.norm_placement`` puts them (pre-norm: ``h = x +
        attention_layer(norm(x))``, ``h + mlp_layer(norm(h))``).

        Args:
            x: (B, S, D), the residual stream.
        Returns:
            (B, S, D).
        """
        prefix = f"layers.{layer}."
        names = [k[len(prefix) :] for k in param_shapes(config) if k.startswith(prefix)]
        x, p = self._layer_inputs("block", x, params, config, layer, names, positions, cache)
        return self._block(x, p, layer)

    def transformer(
        self,
        tokens: Array,
        params: Params,
        config: TransformerConfig,
        /,
        *,
        cache: KVCache | None = None,
        positions: Array | None = None,
    ) -> Array:
        r"""The logits of every token: embed → blocks → norm → lm_head (see the module for the model).

        Without a cache the S tokens are a whole sequence (positions 0 .. S − 1, causal). With a cache
        they continue what it holds: ``cache.reserve(S)`` (raises ValueError past capacity, leaving the
        cache unchanged), each layer writes its keys and values, then ``cache.advance(S)``; the result
        equals the logits of the last S tokens of a forward pass over the whole sequence.

        Args:
            tokens: (B, S) ints in [0, vocab_size).  params: matching ``config``.  cache: a cache made by
            `kv_cache` for this config with ``batch == B``.  positions: (S,) or (B, S), see the module.
        Returns:
            (B, S, V) logits in the parameters' dtype.
        """
        p, tokens = self._transformer_inputs("transformer", tokens, params, config, cache, positions)
        return self._transformer(tokens, p)

    def generate(
        self,
        params: Params,
        config: TransformerConfig,
        prompt: Array,
        /,
        *,
        max_new_tokens: int,
        cache: Literal["contiguous", "paged"] | None = "contiguous",
    ) -> Array:
        r"""Greedy decoding: append ``argmax(logits[:, -1])`` (the first maximum on ties)
        ``max_new_tokens`` times.

        With ``cache`` a kind, one cache of that kind with ``max_len = P + max_new_tokens`` is made
        (`kv_cache`), the prompt is run once and each step feeds only the last token; with None the whole
        prefix is recomputed at every step. Both give the same tokens (the cached logits equal the
        recomputed ones up to rounding).

        Args:
            prompt: (B, P) ints, every prompt of the batch the same length P >= 1, in an integer dtype
            that holds vocab_size − 1 (the generated ids are returned in it; a narrower dtype, such as
            uint8 for a vocabulary over 256, is refused with TypeError rather than wrapping them).
            max_new_tokens: >= 0; ``P + max_new_tokens <= max_seq_len``.
        Returns:
            (B, P + max_new_tokens) ints, the prompt's dtype: the prompt followed by the generated tokens.
        """
        from .generate import generate

        return generate(self, params, config, prompt, max_new_tokens, cache)

    def kv_cache(
        self,
        config: TransformerConfig,
        batch: int,
        max_len: int,
        /,
        *,
        kind: Literal["contiguous", "paged"] = "contiguous",
        block_size: int = BLOCK_SIZE,
        num_blocks: int | None = None,
        dtype: str = "float32",
    ) -> KVCache:
        r"""An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (see `tensorglot.cache`).

        Args:
            kind: ``contiguous`` ((K, B·max_len, H) per layer) or ``paged``.
            block_size: tokens per block (paged).  num_blocks: the pool's size (paged), default enough
            for every sequence to reach ``max_len``: ``batch · ceil(max_len / block_size)``.
            dtype: the storage dtype; it must be the parameters' dtype.
        Returns:
            a `KVCache` (a `PagedKVCache` when paged).
        """
        return cache_module.kv_cache(
            self._be, config, batch, max_len, kind=kind, block_size=block_size, num_blocks=num_blocks, dtype=dtype
        )

    def loss(self, tokens: Array, targets: Array, params: Params, config: TransformerConfig, /) -> Array:
        r"""The mean next-token cross-entropy: ``mean over (b, s) of −log softmax(transformer(tokens)[b,
        s])[targets[b, s]]``, with a max-subtracted log-sum-exp, a 0-d array in the parameters' dtype.

        Built from the backend's kernels, so a backend with the ``grad`` capability differentiates it
        with its own autograd (``torch.autograd``, ``jax.grad``); `value_and_grad` gives the same
        gradient from the explicit backward pass.
        """
        from .training import loss

        return loss(self, tokens, targets, params, config)

    def value_and_grad(
        self, tokens: Array, targets: Array, params: Params, config: TransformerConfig, /
    ) -> tuple[Array, dict[str, Array]]:
        r"""The mean next-token cross-entropy (`loss`) and its gradient with respect to every parameter.

        The gradient is the backward pass of the whole model written out from the kernels' explicit
        ``*_backward`` (`tensorglot.training`), the same on every backend; on an autograd backend the
        conformance suite checks that its autograd of `loss` agrees.

        Args:
            tokens, targets: (B, S) ints in [0, vocab_size), S <= max_seq_len.
        Returns:
            ``(loss, grads)``: loss a 0-d array in the parameters' dtype; grads a dict with every key of
            ``params`` (in its order) and arrays of their shapes and dtype (tied embeddings: ``embed``'s
            gradient holds both its uses).
        """
        from .training import value_and_grad

        return value_and_grad(self, tokens, targets, params, config)

    # -- validation: once per public call ---------------------------------------------------------

    def _model(self, fn: str, params: Params, config: TransformerConfig, names: Any = None) -> tuple[dict, str]:
        """The params as this backend's arrays and their one float dtype; ``names`` (the few that one
        layer reads) or every name of the config must be there with its shape, on one device."""
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
        if not isinstance(params, Mapping):
            raise TypeError(f"{fn}: params must be a dict of arrays, got {type(params).__name__}")
        if names is None:
            params = {k: self._array(v) for k, v in params.items()}
            check_params(fn, {k: shape(v) for k, v in params.items()}, config)
        else:
            missing = [k for k in names if k not in params]
            if missing:
                raise ValueError(f"{fn}: params do not match the config: missing {missing}")
            wanted = param_shapes(config)
            params = {k: self._array(params[k]) for k in names}
            for k, v in params.items():
                if shape(v) != wanted[k]:
                    raise checks.bad_shape(fn, f"params[{k!r}]", shape(v), str(wanted[k]))
        dtypes = {self._be.dtype_name(v) for v in params.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in checks.FLOAT_DTYPES:
            raise TypeError(f"{fn}: params must share one float dtype, got {sorted(dtypes)}")
        self._same_device(fn, params)
        return params, dtypes.pop()

    def _tokens(self, fn, arg, tokens, config, params, start=0):
        tokens = self._ints(fn, arg, tokens)
        checks.check_ids(fn, arg, self._be.dtype_name(tokens), config.vocab_size)
        lo = hi = 0
        if math.prod(shape(tokens)) and not self._be.is_traced(tokens):  # a traced token has no value
            xp = array_namespace(tokens)
            lo, hi = int(xp.min(tokens)), int(xp.max(tokens))
        check_tokens(fn, arg, shape(tokens), lo, hi, config, start=start)
        self._same_device(fn, {arg: tokens, "params": next(iter(params.values()))})
        return tokens

    def _positions(self, fn, positions, B, S, config):
        positions = self._int(fn, "positions", positions)
        if shape(positions) not in ((S,), (B, S)):
            raise checks.bad_shape(fn, "positions", shape(positions), f"(S,) = ({S},) or (B, S) = ({B}, {S})")
        if math.prod(shape(positions)) and not self._be.is_traced(positions):
            xp = array_namespace(positions)
            lo, hi = int(xp.min(positions)), int(xp.max(positions))
            if lo < 0 or hi >= config.max_seq_len:
                raise ValueError(
                    f"{fn}: positions must lie in [0, max_seq_len) = [0, {config.max_seq_len}), got [{lo}, {hi}]"
                )
        return positions

    def _transformer_inputs(self, fn, tokens, params, config, cache, positions):
        """The pass of `transformer` (validated params, positions and cache) and the validated tokens."""
        params, dtype = self._model(fn, params, config)
        tokens = self._int(fn, "tokens", tokens)
        checks.check_rank(fn, "tokens", shape(tokens), "(B, S)")
        start = 0
        if cache is not None:
            be = self._be
            check_cache(fn, cache, shape(tokens)[0], config, backend=be, dtype=dtype, device=be.device(params["embed"]))
            start = int(cache.lengths().max())  # the longest sequence's new tokens must fit max_seq_len
        tokens = self._tokens(fn, "tokens", tokens, config, params, start)
        B, S = shape(tokens)
        if positions is not None:
            positions = self._positions(fn, positions, B, S, config)
        return _Pass(params, dtype, config, array_namespace(tokens), positions, cache), tokens

    def _layer_inputs(self, fn, x, params, config, layer, names, positions, cache):
        """The validated x and the pass of one layer function (its params: ``names`` of that layer)."""
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
        layer = self._index(fn, "layer", layer, allow_zero=True)
        if layer >= config.n_layers:
            raise ValueError(f"{fn}: layer must be in [0, {config.n_layers}), got {layer}")
        params, dtype = self._model(fn, params, config, [f"layers.{layer}.{n}" for n in names])
        x, x_dtype = self._float(fn, "x", x)
        if len(shape(x)) != 3 or shape(x)[2] != config.d_model:
            raise checks.bad_shape(fn, "x", shape(x), f"(B, S, D) with D = {config.d_model}")
        if x_dtype != dtype:
            raise TypeError(f"{fn}: x has dtype {x_dtype}, the params {dtype}")
        self._same_device(fn, {"x": x, "params": next(iter(params.values()))})
        B, S, _ = shape(x)
        if cache is not None:
            check_cache(fn, cache, B, config, backend=self._be, dtype=dtype, device=self._be.device(x))
        if positions is not None:
            positions = self._positions(fn, positions, B, S, config)
        p = _Pass(params, dtype, config, array_namespace(x), positions, cache)
        if positions is None and cache is not None:
            p.positions = self._cache_positions(p, S)
        return x, p


#: The public names of the namespace, in the order the docs list them.
NAMES = (
    "attention_layer",
    "mlp_layer",
    "block",
    "transformer",
    "generate",
    "kv_cache",
    "loss",
    "value_and_grad",
)
