"""JAX layers: see the spec, `tensorglot.layers`. Pure functions over the parameter dict (a pytree).

One forward pass (`_forward`) serves every path: eager calls, ``jax.jit`` (the config is a static,
hashable argument), a cached step (the cache's arrays go in and come out, rebound on the handle) and
`generate`, which compiles the prompt pass and a `lax.fori_loop` of single-token steps into one program.
Validation runs on the host before tracing; values of traced tokens cannot be checked (shapes are).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tensorglot import checks
from tensorglot.cache import check_cache
from tensorglot.params import TransformerConfig, check_params, check_tokens

from ._common import as_array, as_int, compute_dtype, is_traced, lazy_frontend
from .cache import CacheView, JaxKVCache, kv_cache, storage_shape

ops, encodings = lazy_frontend("ops"), lazy_frontend("encodings")  # the spec's front ends of this backend

__all__ = ["attention_layer", "mlp_layer", "block", "transformer", "generate", "kv_cache", "value_and_grad"]

# -- validation ------------------------------------------------------------------------------------


def _check_model(fn, params, config):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
    check_params(fn, {k: tuple(jnp.shape(v)) for k, v in params.items()}, config)
    dtypes = {str(as_array(v).dtype) for v in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in checks.FLOAT_DTYPES:
        raise TypeError(f"{fn}: params must share one float dtype, got {sorted(dtypes)}")
    return {k: as_array(v) for k, v in params.items()}


def _tokens(fn, arg, tokens, config, start=0):
    tokens = as_int(fn, arg, tokens)
    lo = hi = 0
    if tokens.size and not is_traced(tokens):  # a traced token has no value to check
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
    check_tokens(fn, arg, tokens.shape, lo, hi, config, start=start)
    return tokens


def _layer(fn, layer, config):
    layer = checks.check_positive_int(fn, "layer", layer, allow_zero=True)
    if layer >= config.n_layers:
        raise ValueError(f"{fn}: layer must be in [0, {config.n_layers}), got {layer}")
    return layer


def _positions(fn, positions, B, S, config):
    positions = as_int(fn, "positions", positions)
    if positions.shape not in ((S,), (B, S)):
        raise checks.bad_shape(fn, "positions", positions.shape, f"(S,) = ({S},) or (B, S) = ({B}, {S})")
    if positions.size and not is_traced(positions):
        lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
        if lo < 0 or hi >= config.max_seq_len:
            raise ValueError(
                f"{fn}: positions must lie in [0, max_seq_len) = [0, {config.max_seq_len}), got [{lo}, {hi}]"
            )
    return positions


def _check_x(fn, x, params, config):
    x = as_array(x)
    if x.ndim != 3 or x.shape[2] != config.d_model:
        raise checks.bad_shape(fn, "x", x.shape, f"(B, S, D) with D = {config.d_model}")
    if x.dtype != params["embed"].dtype:
        raise TypeError(f"{fn}: x has dtype {x.dtype}, the params {params['embed'].dtype}")
    return x


# -- the model -------------------------------------------------------------------------------------


def _rope(x, positions, config):
    return encodings.rope(
        x,
        positions=positions,
        theta=config.rope_theta,
        style=config.rope_style,
        rotary_dim=config.rotary_dim,
        scaling=config.rope_scaling,
    )


def _attention(x, p, config, positions, cache, layer):
    B, S, D = x.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    q = ops.linear(x, p["wq"].reshape(D, N * H)).reshape(B, S, N, H)  # (B, S, N, H)
    k = ops.linear(x, p["wk"].reshape(D, K * H)).reshape(B, S, K, H)  # (B, S, K, H)
    v = ops.linear(x, p["wv"].reshape(D, K * H)).reshape(B, S, K, H)
    q, k = _rope(q, positions, config), _rope(k, positions, config)  # never v
    if cache is None:
        y = ops.attention(q, k, v, causal=True)
    else:
        k_all, v_all = cache.update(layer, k, v)  # (B, T, K, H), T = max_len: keys past a length masked
        y = ops.attention(q, k_all, v_all, mask=cache.mask(S, k_all.shape[1]))
    return ops.linear(y.reshape(B, S, N * H), p["wo"].reshape(N * H, D))  # (B, S, D)


def _mlp(x, p, config):
    if config.activation == "swiglu":
        return ops.swiglu(x, p["w_gate"], p["w_up"], p["w_down"])
    return ops.mlp(x, p["w_in"], p["w_out"], activation=config.activation)


_mlp_jit = jax.jit(_mlp, static_argnames="config")


def _block(x, p, config, positions, cache, layer):
    h = x + _attention(ops.rms_norm(x, p["attn_norm"], eps=config.norm_eps), p, config, positions, cache, layer)
    return h + _mlp(ops.rms_norm(h, p["mlp_norm"], eps=config.norm_eps), p, config)


def _layer_params(params, layer):
    prefix = f"layers.{layer}."
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _forward(tokens, params, config, positions, cache):
    x = params["embed"][tokens]  # (B, S, D)
    for i in range(config.n_layers):
        x = _block(x, _layer_params(params, i), config, positions, cache, i)
    n = ops.rms_norm(x, params["norm"], eps=config.norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]  # (D, V)
    return ops.linear(n, head)  # (B, S, V)


@partial(jax.jit, static_argnames="config")
def _forward_jit(tokens, params, positions, *, config):
    return _forward(tokens, params, config, positions, None)


@partial(jax.jit, static_argnames=("config", "kind"))
def _cached_forward(tokens, params, positions, k, v, lengths, slots, gather, *, config, kind):
    view = CacheView(k, v, lengths, slots, gather, kind)
    return _forward(tokens, params, config, positions, view), view.k, view.v


@partial(jax.jit, static_argnames=("config", "layer", "kind", "what"))
def _layer_jit(x, p, positions, k, v, lengths, slots, gather, *, config, layer, kind, what):
    """`_block` or `_attention` of one layer, compiled; with a cache, its arrays go in and come out."""
    view = None if kind is None else CacheView(k, v, lengths, slots, gather, kind)
    f = _block if what == "block" else _attention
    return f(x, p, config, positions, view, layer), None if view is None else (view.k, view.v)


def _call_layer(what, x, params, config, positions, cache, layer):
    p = _layer_params(params, layer)
    if cache is None:
        return _layer_jit(
            x, p, positions, None, None, None, None, None, config=config, layer=layer, kind=None, what=what
        )[0]
    y, (k, v) = _layer_jit(
        x, p, positions, cache.k, cache.v, *cache.indices(), config=config, layer=layer, kind=cache.kind, what=what
    )
    cache.rebind(k, v)
    return y


def _step_positions(fn, positions, cache, B, S, config):
    if positions is not None:
        return _positions(fn, positions, B, S, config)
    if cache is None:
        return jnp.arange(S)
    return jnp.asarray(cache.lengths()[:, None] + np.arange(S), jnp.int32)  # (B, S): each row continues


def attention_layer(x, params, config, /, *, layer, positions=None, cache=None):
    fn = "attention_layer"
    params = _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    if cache is not None:
        check_cache(fn, cache, x.shape[0], config, cls=JaxKVCache, what="a jax KV cache")
    positions = _step_positions(fn, positions, cache, x.shape[0], x.shape[1], config)
    return _call_layer("attention", x, params, config, positions, cache, layer)


def mlp_layer(x, params, config, /, *, layer):
    fn = "mlp_layer"
    params = _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    return _mlp_jit(x, _layer_params(params, _layer(fn, layer, config)), config=config)


def block(x, params, config, /, *, layer, positions=None, cache=None):
    fn = "block"
    params = _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    if cache is not None:
        check_cache(fn, cache, x.shape[0], config, cls=JaxKVCache, what="a jax KV cache")
    positions = _step_positions(fn, positions, cache, x.shape[0], x.shape[1], config)
    return _call_layer("block", x, params, config, positions, cache, layer)


def transformer(tokens, params, config, /, *, cache=None, positions=None):
    fn = "transformer"
    params = _check_model(fn, params, config)
    if cache is not None:
        check_cache(
            fn, cache, jnp.shape(tokens)[0] if jnp.ndim(tokens) else 0, config, cls=JaxKVCache, what="a jax KV cache"
        )
    start = 0 if cache is None else int(cache.lengths().max())
    tokens = _tokens(fn, "tokens", tokens, config, start)
    B, S = tokens.shape
    positions = _step_positions(fn, positions, cache, B, S, config)
    if cache is None:
        return _forward_jit(tokens, params, positions, config=config)
    cache.reserve(S)  # raises past capacity before anything is written
    logits, k, v = _cached_forward(
        tokens, params, positions, cache.k, cache.v, *cache.indices(), config=config, kind=cache.kind
    )
    cache.rebind(k, v)
    cache.advance(S)
    return logits


# -- generation ------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("config", "new"))
def _generate_recompute(params, prompt, *, config, new):
    """Each step reruns the model over the whole (B, P + new) buffer: causal attention keeps the tokens
    not yet written from reaching position t − 1, so its logits are those of the prefix."""
    B, P = prompt.shape
    L = P + new
    out = jnp.zeros((B, L), prompt.dtype).at[:, :P].set(prompt)

    def body(t, out):
        logits = _forward(out, params, config, jnp.arange(L), None)  # (B, L, V)
        last = lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)  # (B, V)
        return lax.dynamic_update_slice(out, last.argmax(-1).astype(out.dtype)[:, None], (0, t))

    return lax.fori_loop(P, L, body, out)


@partial(jax.jit, static_argnames=("config", "new", "kind", "block_size"))
def _generate_cached(params, prompt, *, config, new, kind, block_size):
    B, P = prompt.shape
    L = P + new
    K, H = config.n_kv_heads, config.head_dim
    gather = table = None
    num_slots = 0
    if kind == "paged":  # sequence b owns blocks b·per_seq .. : the table is static, the slots traced
        per_seq = -(-L // block_size)
        table = jnp.arange(B * per_seq, dtype=jnp.int32).reshape(B, per_seq)  # (B, blocks)
        num_slots = B * per_seq * block_size
        pos = jnp.arange(L)
        gather = table[:, pos // block_size] * block_size + pos % block_size  # (B, L)
    shape = storage_shape(kind, B, L, num_slots, K, H)
    dtype = params["embed"].dtype
    ks = [jnp.zeros(shape, dtype) for _ in range(config.n_layers)]
    vs = [jnp.zeros(shape, dtype) for _ in range(config.n_layers)]

    def step(tokens, ks, vs, lengths):
        S = tokens.shape[1]
        positions = lengths[:, None] + jnp.arange(S, dtype=jnp.int32)  # (B, S)
        slots = None
        if table is not None:
            slots = jnp.take_along_axis(table, positions // block_size, axis=1) * block_size + positions % block_size
        view = CacheView(ks, vs, lengths, slots, gather, kind)
        logits = _forward(tokens, params, config, positions, view)
        return logits[:, -1].argmax(-1).astype(tokens.dtype), view.k, view.v, lengths + S

    out = jnp.zeros((B, L), prompt.dtype).at[:, :P].set(prompt)
    nxt, ks, vs, lengths = step(prompt, ks, vs, jnp.zeros(B, jnp.int32))
    out = out.at[:, P].set(nxt)

    def body(t, carry):
        out, ks, vs, lengths = carry
        last = lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1)  # (B, 1)
        nxt, ks, vs, lengths = step(last, ks, vs, lengths)
        return lax.dynamic_update_slice(out, nxt[:, None], (0, t)), ks, vs, lengths

    return lax.fori_loop(P + 1, L, body, (out, ks, vs, lengths))[0]


def generate(params, config, prompt, /, *, max_new_tokens, cache="contiguous"):
    fn = "generate"
    params = _check_model(fn, params, config)
    prompt = _tokens(fn, "prompt", prompt, config)
    new = checks.check_positive_int(fn, "max_new_tokens", max_new_tokens, allow_zero=True)
    P = prompt.shape[1]
    if P + new > config.max_seq_len:
        raise ValueError(f"{fn}: prompt length {P} + max_new_tokens {new} > max_seq_len = {config.max_seq_len}")
    if cache is not None:
        checks.check_choice(fn, "cache", cache, ("contiguous", "paged"))
    if new == 0:
        return prompt
    if cache is None:
        return _generate_recompute(params, prompt, config=config, new=new)
    return _generate_cached(params, prompt, config=config, new=new, kind=cache, block_size=16)


# -- training --------------------------------------------------------------------------------------


def _loss(params, tokens, targets, config):
    logits = _forward(tokens, params, config, jnp.arange(tokens.shape[1]), None)
    z = logits.astype(compute_dtype(logits.dtype))
    m = lax.stop_gradient(z.max(axis=-1, keepdims=True))  # only for stability: lse does not depend on it
    lse = m[..., 0] + jnp.log(jnp.exp(z - m).sum(axis=-1))  # (B, S)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return (lse - picked).mean()


@partial(jax.jit, static_argnames="config")
def _value_and_grad(tokens, targets, params, *, config):
    loss, grads = jax.value_and_grad(_loss)(params, tokens, targets, config)
    return loss.astype(params["embed"].dtype), grads


def value_and_grad(tokens, targets, params, config, /):
    fn = "value_and_grad"
    params = _check_model(fn, params, config)
    tokens = _tokens(fn, "tokens", tokens, config)
    targets = _tokens(fn, "targets", targets, config)
    checks.check_same_shape(fn, "targets", targets.shape, tokens.shape, "tokens")
    loss, grads = _value_and_grad(tokens, targets, params, config=config)
    return loss, {k: grads[k] for k in params}
