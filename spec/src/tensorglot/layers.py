"""The layers namespace: a decoder-only transformer as functions over a flat dict of parameters.

Parameters are the ``dict[str, array]`` of `tensorglot.params` (names and shapes there), made by
`tensorglot.init_params` and put on a backend with ``{k: be.asarray(v) for k, v in params.items()}``;
the configuration is a `tensorglot.TransformerConfig`. Every backend's ``layers`` module provides these
functions with these signatures (a conformance test compares them). Shapes: B batch, S new tokens,
T keys, D d_model, N query heads, K kv heads, H head dim, V vocabulary.

The model (pinned):
  * ``transformer``: ``x = embed[tokens]`` → ``n_layers`` × `block` → ``rms_norm(x, norm)`` →
    ``logits = x @ lm_head`` (or ``x @ embed.T`` when ``tie_embeddings``). No biases, no dropout, no
    embedding scale.
  * ``block`` is pre-norm: ``h = x + attention_layer(rms_norm(x, attn_norm))``, then
    ``out = h + mlp_layer(rms_norm(h, mlp_norm))``; both norms use ``config.norm_eps``.
  * ``attention_layer``: ``q = einsum("bsd,dnh->bsnh", x, wq)``, k and v likewise with wk, wv (K heads);
    RoPE (``config.rope_*``, at the tokens' positions) on q and k, never on v; `Ops.attention` with
    query head h reading kv head h // (N // K), causal (bottom-right), scale 1/√H; then
    ``einsum("bsnh,nhd->bsd", y, wo)``.
  * ``mlp_layer``: ``Ops.mlp(x, w_in, w_out, activation=config.activation)``, or ``Ops.swiglu(x, w_gate,
    w_up, w_down)`` when the activation is ``swiglu``.
  * Positions: without a cache, ``arange(S)``; with one, sequence b's new tokens sit at
    ``cache.lengths()[b] + arange(S)``. ``positions`` overrides the positions RoPE uses (not where the
    cache writes). A position must be < ``max_seq_len``.
  * Precision: logits and every activation have the parameters' dtype; half precision is computed in
    float32 inside each op, as the ops say.

Errors: params that do not match the config (a missing, unexpected or misshapen array), tokens that are
not ints of shape (B, S), out of [0, vocab_size), or past ``max_seq_len`` raise ValueError/TypeError
naming the function and what was wrong (`tensorglot.params.check_params`, `check_tokens`).

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

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from .cache import KVCache
from .params import TransformerConfig

Array = Any
Params = Mapping[str, Array]


class Layers(Protocol):
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
        ...

    def mlp_layer(self, x: Array, params: Params, config: TransformerConfig, /, *, layer: int) -> Array:
        r"""The MLP of layer ``layer``, without its norm or residual: ``mlp`` or ``swiglu`` by
        ``config.activation``.

        Args:
            x: (B, S, D), already normalised.
        Returns:
            (B, S, D).
        """
        ...

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
        r"""One pre-norm block: ``h = x + attention_layer(rms_norm(x))``, ``h + mlp_layer(rms_norm(h))``.

        Args:
            x: (B, S, D), the residual stream.
        Returns:
            (B, S, D).
        """
        ...

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
        r"""The logits of every token: embed → blocks → rms_norm → lm_head.

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
        ...

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
            prompt: (B, P) ints, every prompt of the batch the same length P >= 1.
            max_new_tokens: >= 0; ``P + max_new_tokens <= max_seq_len``.
        Returns:
            (B, P + max_new_tokens) ints: the prompt followed by the generated tokens.
        """
        ...

    def kv_cache(
        self,
        config: TransformerConfig,
        batch: int,
        max_len: int,
        /,
        *,
        kind: Literal["contiguous", "paged"] = "contiguous",
        block_size: int = 16,
        num_blocks: int | None = None,
        dtype: str = "float32",
    ) -> KVCache:
        r"""An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (see `tensorglot.cache`).

        Args:
            kind: ``contiguous`` ((B, max_len, K, H) per layer) or ``paged``.
            block_size: tokens per block (paged).  num_blocks: the pool's size (paged), default enough
            for every sequence to reach ``max_len``: ``batch · ceil(max_len / block_size)``.
            dtype: the storage dtype; it must be the parameters' dtype.
        Returns:
            a `KVCache` (a `PagedKVCache` when paged).
        """
        ...

    def value_and_grad(
        self, tokens: Array, targets: Array, params: Params, config: TransformerConfig, /
    ) -> tuple[Array, dict[str, Array]]:
        r"""The mean next-token cross-entropy and its gradient with respect to every parameter.

        ``loss = mean over (b, s) of −log softmax(transformer(tokens)[b, s])[targets[b, s]]`` (computed
        with a max-subtracted log-sum-exp). The gradient is the backward pass of the whole model, built
        from the ops' ``*_backward`` functions (the NumPy reference) or the backend's autograd.

        Args:
            tokens, targets: (B, S) ints in [0, vocab_size), S <= max_seq_len.
        Returns:
            ``(loss, grads)``: loss a 0-d array in the parameters' dtype; grads a dict with every key of
            ``params`` and arrays of their shapes and dtype (tied embeddings: ``embed``'s gradient holds
            both its uses).
        """
        ...


#: The public names of the namespace, in the order the docs list them.
NAMES = tuple(n for n in Layers.__dict__ if not n.startswith("_"))
