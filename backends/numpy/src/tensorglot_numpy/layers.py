"""NumPy layers: see the spec, `tensorglot.layers`. The reference transformer: forward composed from
the ops, and a backward pass composed from the ops' ``*_backward`` functions."""

from __future__ import annotations

import numpy as np

from tensorglot import checks
from tensorglot.cache import check_cache, visible_mask
from tensorglot.params import TransformerConfig, check_params, check_tokens

from ._common import as_int, compute_dtype, lazy_frontend
from .cache import kv_cache

ops, encodings = lazy_frontend("ops"), lazy_frontend("encodings")  # the spec's front ends of this backend

__all__ = ["attention_layer", "mlp_layer", "block", "transformer", "generate", "kv_cache", "value_and_grad"]


# -- validation ------------------------------------------------------------------------------------


def _check_model(fn, params, config):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
    check_params(fn, {k: tuple(np.shape(v)) for k, v in params.items()}, config)
    dtypes = {str(np.asarray(v).dtype) for v in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ("float64", "float32", "float16"):
        raise TypeError(f"{fn}: params must share one float dtype, got {sorted(dtypes)}")


def _tokens(fn, arg, tokens, config, start=0):
    tokens = as_int(fn, arg, tokens)
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
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
    if positions.size and (positions.min() < 0 or positions.max() >= config.max_seq_len):
        raise ValueError(
            f"{fn}: positions must lie in [0, max_seq_len) = [0, {config.max_seq_len}), "
            f"got [{positions.min()}, {positions.max()}]"
        )
    return positions


# -- the layers ------------------------------------------------------------------------------------


def _rope(x, positions, config, *, backward=False):
    f = encodings.rope_backward if backward else encodings.rope
    return f(
        x,
        positions=positions,
        theta=config.rope_theta,
        style=config.rope_style,
        rotary_dim=config.rotary_dim,
        scaling=config.rope_scaling,
    )


def _attention(x, p, config, positions, cache, layer, saved=None):
    B, S, D = x.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    wq, wk, wv, wo = p["wq"], p["wk"], p["wv"], p["wo"]
    q = ops.linear(x, wq.reshape(D, N * H)).reshape(B, S, N, H)  # (B, S, N, H)
    k = ops.linear(x, wk.reshape(D, K * H)).reshape(B, S, K, H)  # (B, S, K, H)
    v = ops.linear(x, wv.reshape(D, K * H)).reshape(B, S, K, H)
    q, k = _rope(q, positions, config), _rope(k, positions, config)  # never v
    if cache is None:
        y = ops.attention(q, k, v, causal=True)
    else:
        k_all, v_all = cache.update(layer, k, v)  # (B, T, K, H), keys stored after RoPE
        mask = visible_mask(cache.lengths(), S, k_all.shape[1])  # (B, 1, S, T)
        y = ops.attention(q, k_all, v_all, mask=mask)
    y = y.reshape(B, S, N * H)  # (B, S, N·H)
    if saved is not None:
        saved.update(q=q, k=k, v=v, y=y)
    return ops.linear(y, wo.reshape(N * H, D))  # (B, S, D)


def _mlp(x, p, config):
    if config.activation == "swiglu":
        return ops.swiglu(x, p["w_gate"], p["w_up"], p["w_down"])
    return ops.mlp(x, p["w_in"], p["w_out"], activation=config.activation)


def _block(x, p, config, positions, cache, layer, saved=None):
    a = ops.rms_norm(x, p["attn_norm"], eps=config.norm_eps)
    h = x + _attention(a, p, config, positions, cache, layer, saved)
    m = ops.rms_norm(h, p["mlp_norm"], eps=config.norm_eps)
    if saved is not None:
        saved.update(x=x, a=a, h=h, m=m)
    return h + _mlp(m, p, config)


def _layer_params(params, layer):
    prefix = f"layers.{layer}."
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _check_x(fn, x, params, config):
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[2] != config.d_model:
        raise checks.bad_shape(fn, "x", x.shape, f"(B, S, D) with D = {config.d_model}")
    if x.dtype != params["embed"].dtype:
        raise TypeError(f"{fn}: x has dtype {x.dtype}, the params {params['embed'].dtype}")
    return x


def _step_positions(fn, positions, cache, B, S, config):
    if positions is not None:
        return _positions(fn, positions, B, S, config)
    if cache is None:
        return np.arange(S)
    return cache.lengths()[:, None] + np.arange(S)  # (B, S): each sequence continues where it is


def attention_layer(x, params, config, /, *, layer, positions=None, cache=None):
    fn = "attention_layer"
    _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    if cache is not None:
        check_cache(fn, cache, x.shape[0], config)
    positions = _step_positions(fn, positions, cache, x.shape[0], x.shape[1], config)
    return _attention(x, _layer_params(params, layer), config, positions, cache, layer)


def mlp_layer(x, params, config, /, *, layer):
    fn = "mlp_layer"
    _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    return _mlp(x, _layer_params(params, layer), config)


def block(x, params, config, /, *, layer, positions=None, cache=None):
    fn = "block"
    _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    if cache is not None:
        check_cache(fn, cache, x.shape[0], config)
    positions = _step_positions(fn, positions, cache, x.shape[0], x.shape[1], config)
    return _block(x, _layer_params(params, layer), config, positions, cache, layer)


def _logits_weight(params, config):
    return params["embed"].T if config.tie_embeddings else params["lm_head"]  # (D, V)


def _forward(tokens, params, config, positions, cache, tape=None):
    x = params["embed"][tokens]  # (B, S, D)
    for i in range(config.n_layers):
        saved: dict | None = None if tape is None else {}
        x = _block(x, _layer_params(params, i), config, positions, cache, i, saved)
        if tape is not None:
            tape.append(saved)
    n = ops.rms_norm(x, params["norm"], eps=config.norm_eps)
    if tape is not None:
        tape.append({"x": x, "n": n})
    return ops.linear(n, _logits_weight(params, config))  # (B, S, V)


def transformer(tokens, params, config, /, *, cache=None, positions=None):
    fn = "transformer"
    _check_model(fn, params, config)
    tokens = as_int(fn, "tokens", tokens)
    checks.check_rank(fn, "tokens", tokens.shape, "(B, S)")
    start = 0
    if cache is not None:
        check_cache(fn, cache, tokens.shape[0], config)
        start = int(cache.lengths().max())  # the longest sequence's new tokens must fit max_seq_len
    tokens = _tokens(fn, "tokens", tokens, config, start)
    B, S = tokens.shape
    positions = _step_positions(fn, positions, cache, B, S, config)
    if cache is None:
        return _forward(tokens, params, config, positions, None)
    cache.reserve(S)  # raises past capacity before anything is written
    logits = _forward(tokens, params, config, positions, cache)
    cache.advance(S)
    return logits


def generate(params, config, prompt, /, *, max_new_tokens, cache="contiguous"):
    fn = "generate"
    _check_model(fn, params, config)
    prompt = _tokens(fn, "prompt", prompt, config)
    new = checks.check_positive_int(fn, "max_new_tokens", max_new_tokens, allow_zero=True)
    B, P = prompt.shape
    if P + new > config.max_seq_len:
        raise ValueError(f"{fn}: prompt length {P} + max_new_tokens {new} > max_seq_len = {config.max_seq_len}")
    if cache is not None:
        checks.check_choice(fn, "cache", cache, ("contiguous", "paged"))
    out = np.empty((B, P + new), dtype=prompt.dtype)
    out[:, :P] = prompt
    if new == 0:
        return out
    if cache is None:
        for t in range(P, P + new):
            out[:, t] = _forward(out[:, :t], params, config, np.arange(t), None)[:, -1].argmax(-1)
        return out
    c = kv_cache(config, B, P + new, kind=cache, dtype=str(params["embed"].dtype))
    logits = transformer(prompt, params, config, cache=c)
    for t in range(P, P + new):
        out[:, t] = logits[:, -1].argmax(-1)
        if t + 1 < P + new:
            logits = transformer(out[:, t : t + 1], params, config, cache=c)
    return out


# -- training: the loss and the whole model's backward pass ----------------------------------------


def _cross_entropy(logits, targets):
    """(mean loss, dloss/dlogits)."""
    B, S = targets.shape
    z = logits.astype(compute_dtype(logits.dtype), copy=False)
    m = z.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))  # (B, S, 1)
    picked = np.take_along_axis(z, targets[..., None], axis=-1)
    loss = (lse - picked).mean()
    dz = np.exp(z - lse)  # softmax
    np.put_along_axis(dz, targets[..., None], np.take_along_axis(dz, targets[..., None], axis=-1) - 1.0, axis=-1)
    return loss, dz / (B * S)


def _block_backward(dout, p, config, positions, s, g):
    """Fill g with the block's parameter gradients; return dx. ``s`` is what `_block` saved."""
    eps = config.norm_eps
    B, S, D = dout.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    # out = h + mlp(m), m = rms_norm(h)
    if config.activation == "swiglu":
        dm, g["w_gate"], g["w_up"], g["w_down"] = ops.swiglu_backward(s["m"], p["w_gate"], p["w_up"], p["w_down"], dout)
    else:
        dm, g["w_in"], g["w_out"] = ops.mlp_backward(s["m"], p["w_in"], p["w_out"], dout, activation=config.activation)
    dh_norm, g["mlp_norm"] = ops.rms_norm_backward(s["h"], p["mlp_norm"], dm, eps=eps)
    dh = dout + dh_norm
    # h = x + attn(a), a = rms_norm(x)
    dy, dwo, _ = ops.linear_backward(s["y"], p["wo"].reshape(N * H, D), dh, bias=False)
    g["wo"] = dwo.reshape(N, H, D)
    dq, dk, dv = ops.attention_backward(s["q"], s["k"], s["v"], dy.reshape(B, S, N, H), causal=True)
    dq = _rope(dq, positions, config, backward=True)
    dk = _rope(dk, positions, config, backward=True)
    da = np.zeros_like(s["a"])
    for name, d, heads in (("wq", dq, N), ("wk", dk, K), ("wv", dv, K)):
        dxi, dw, _ = ops.linear_backward(s["a"], p[name].reshape(D, heads * H), d.reshape(B, S, heads * H), bias=False)
        da += dxi
        g[name] = dw.reshape(D, heads, H)
    dx_norm, g["attn_norm"] = ops.rms_norm_backward(s["x"], p["attn_norm"], da, eps=eps)
    return dh + dx_norm


def value_and_grad(tokens, targets, params, config, /):
    fn = "value_and_grad"
    _check_model(fn, params, config)
    tokens = _tokens(fn, "tokens", tokens, config)
    targets = _tokens(fn, "targets", targets, config)
    checks.check_same_shape(fn, "targets", targets.shape, tokens.shape, "tokens")
    positions = np.arange(tokens.shape[1])
    tape: list[dict] = []
    logits = _forward(tokens, params, config, positions, None, tape)
    loss, dlogits = _cross_entropy(logits, targets)
    dtype = params["embed"].dtype
    dlogits = dlogits.astype(dtype, copy=False)
    grads = {}
    final = tape.pop()
    dn, dw, _ = ops.linear_backward(final["n"], _logits_weight(params, config), dlogits, bias=False)
    dx, grads["norm"] = ops.rms_norm_backward(final["x"], params["norm"], dn, eps=config.norm_eps)
    dembed = np.zeros_like(params["embed"])
    if config.tie_embeddings:
        dembed += dw.T
    else:
        grads["lm_head"] = dw
    for i in reversed(range(config.n_layers)):
        g: dict[str, np.ndarray] = {}
        dx = _block_backward(dx, _layer_params(params, i), config, positions, tape[i], g)
        grads |= {f"layers.{i}.{k}": v for k, v in g.items()}
    np.add.at(dembed, tokens, dx)  # a token used twice gets both gradients
    grads["embed"] = dembed
    return np.asarray(loss, dtype=dtype), {k: grads[k] for k in params}
