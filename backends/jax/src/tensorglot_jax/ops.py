"""JAX ops: see the spec, `tensorglot.ops`.

Each differentiable op is a `jax.custom_vjp`: the fwd returns the residuals and the bwd is the spec's
``*_backward`` formula, the same code the public ``*_backward`` functions run. Validation runs at trace
time (shapes are static under jit); options are static Python values (`_common.static`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from tensorglot import checks

from ._common import as_array, as_float, as_int, compute_dtype, flat2d, is_traced, same_dtype, static
from .flash import flash_attention as flash_attention
from .flash import flash_attention_backward as flash_attention_backward

# -- softmax ---------------------------------------------------------------------------------------


def _softmax_math(x, axis):
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isneginf(m), 0.0, m)  # an all -inf row: exp(-inf) = 0 everywhere, handled below
    e = jnp.exp(x - m)
    s = jnp.sum(e, axis=axis, keepdims=True)
    return jnp.where(s == 0, 0.0, e / s)  # s == 0 only for an all -inf row; NaN rows keep NaN


def _softmax_vjp(y, dy, axis):
    cd = compute_dtype(y.dtype)
    yc, dyc = y.astype(cd), dy.astype(cd)
    return (yc * (dyc - jnp.sum(dyc * yc, axis=axis, keepdims=True))).astype(y.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(x, axis):
    return _softmax_math(x.astype(compute_dtype(x.dtype)), axis).astype(x.dtype)


def _softmax_fwd(x, axis):
    y = _softmax(x, axis)
    return y, y


def _softmax_bwd(axis, y, dy):
    return (_softmax_vjp(y, dy, axis),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x, /, *, axis=-1):
    x = as_float("softmax", "x", x)
    axis = checks.normalize_axis("softmax", static("softmax", "axis", axis), x.ndim)
    if x.shape[axis] == 0:
        return x
    return _softmax(x, axis)


def softmax_backward(y, dy, /, *, axis=-1):
    fn = "softmax_backward"
    y, dy = as_float(fn, "y", y), as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, y.shape, "y")
    axis = checks.normalize_axis(fn, static(fn, "axis", axis), y.ndim)
    return _softmax_vjp(y, dy, axis)


# -- linear ----------------------------------------------------------------------------------------


def _linear_vjp(x, w, dy, bias):
    cd = compute_dtype(x.dtype)
    xc, wc, dyc = x.astype(cd), w.astype(cd), dy.astype(cd)
    dx = dyc @ wc.T  # (..., in)
    dw = flat2d(xc).T @ flat2d(dyc)  # (in, out)
    db = flat2d(dyc).sum(axis=0) if bias else None
    return dx.astype(x.dtype), dw.astype(x.dtype), None if db is None else db.astype(x.dtype)


@jax.custom_vjp
def _linear(x, w, b):
    cd = compute_dtype(x.dtype)
    y = x.astype(cd) @ w.astype(cd)  # (..., out)
    if b is not None:
        y = y + b.astype(cd)
    return y.astype(x.dtype)


def _linear_fwd(x, w, b):
    return _linear(x, w, b), (x, w, b)


def _linear_bwd(res, dy):
    x, w, b = res
    return _linear_vjp(x, w, dy, b is not None)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear(x, w, b=None, /):
    fn = "linear"
    x, w = as_float(fn, "x", x), as_float(fn, "w", w)
    b = None if b is None else as_float(fn, "b", b)
    same_dtype(fn, x=x, w=w, b=b)
    checks.linear(fn, x.shape, w.shape, None if b is None else b.shape)
    return _linear(x, w, b)


def linear_backward(x, w, dy, /, *, bias):
    fn = "linear_backward"
    x, w, dy = as_float(fn, "x", x), as_float(fn, "w", w), as_float(fn, "dy", dy)
    same_dtype(fn, x=x, w=w, dy=dy)
    checks.linear(fn, x.shape, w.shape, None)
    checks.check_same_shape(fn, "dy", dy.shape, (*x.shape[:-1], w.shape[1]), "linear's output")
    return _linear_vjp(x, w, dy, bool(static(fn, "bias", bias)))


# -- activations -----------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _activation(h, name):
    """(act(h), act'(h)), in h's dtype."""
    if name == "relu":
        return jnp.maximum(h, 0), (h > 0).astype(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + jax.lax.erf(h / math.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        return h * cdf, cdf + h * pdf
    if name == "gelu_tanh":
        t = jnp.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
        return 0.5 * h * (1.0 + t), grad
    s = jax.nn.sigmoid(h)  # silu
    return h * s, s * (1.0 + h * (1.0 - s))


def _act(h, name):
    return jnp.maximum(h, 0) if name == "relu" else _activation(h, name)[0]


# -- MLPs ------------------------------------------------------------------------------------------


def _mlp_vjp(x, w_in, w_out, h, dy, activation):
    """From the saved pre-activation h (compute dtype); returns (dx, dw_in, dw_out) in x's dtype."""
    cd = h.dtype
    xc, w_in_c, w_out_c, dyc = x.astype(cd), w_in.astype(cd), w_out.astype(cd), dy.astype(cd)
    a, da_dh = _activation(h, activation)
    dw_out = flat2d(a).T @ flat2d(dyc)  # (F, D)
    dh = (dyc @ w_out_c.T) * da_dh  # (..., F)
    dw_in = flat2d(xc).T @ flat2d(dh)  # (D, F)
    dx = dh @ w_in_c.T  # (..., D)
    return tuple(g.astype(x.dtype) for g in (dx, dw_in, dw_out))


def _mlp_h(x, w_in):
    cd = compute_dtype(x.dtype)
    return x.astype(cd) @ w_in.astype(cd)  # (..., F)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlp(x, w_in, w_out, activation):
    return (_act(_mlp_h(x, w_in), activation) @ w_out.astype(compute_dtype(x.dtype))).astype(x.dtype)


def _mlp_fwd(x, w_in, w_out, activation):
    h = _mlp_h(x, w_in)
    y = (_act(h, activation) @ w_out.astype(h.dtype)).astype(x.dtype)
    return y, (x, w_in, w_out, h)


def _mlp_bwd(activation, res, dy):
    x, w_in, w_out, h = res
    return _mlp_vjp(x, w_in, w_out, h, dy, activation)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def _mlp_inputs(fn, x, w_in, w_out, activation):
    x, w_in, w_out = as_float(fn, "x", x), as_float(fn, "w_in", w_in), as_float(fn, "w_out", w_out)
    same_dtype(fn, x=x, w_in=w_in, w_out=w_out)
    checks.mlp(fn, x.shape, w_in.shape, w_out.shape)
    checks.check_choice(fn, "activation", static(fn, "activation", activation), checks.ACTIVATIONS)
    return x, w_in, w_out


def mlp(x, w_in, w_out, /, *, activation="relu"):
    x, w_in, w_out = _mlp_inputs("mlp", x, w_in, w_out, activation)
    return _mlp(x, w_in, w_out, activation)


def mlp_backward(x, w_in, w_out, dy, /, *, activation="relu"):
    fn = "mlp_backward"
    x, w_in, w_out = _mlp_inputs(fn, x, w_in, w_out, activation)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, (*x.shape[:-1], w_out.shape[1]), "mlp's output")
    return _mlp_vjp(x, w_in, w_out, _mlp_h(x, w_in), dy, activation)


def _swiglu_gu(x, w_gate, w_up):
    cd = compute_dtype(x.dtype)
    xc = x.astype(cd)
    return xc @ w_gate.astype(cd), xc @ w_up.astype(cd)  # (..., F) each


def _swiglu_vjp(x, w_gate, w_up, w_down, g, u, dy):
    cd = g.dtype
    xc, wg, wu, wd, dyc = (t.astype(cd) for t in (x, w_gate, w_up, w_down, dy))
    s, ds_dg = _activation(g, "silu")
    dw_down = flat2d(s * u).T @ flat2d(dyc)  # (F, D)
    da = dyc @ wd.T  # (..., F)
    dg = da * u * ds_dg
    du = da * s
    dw_gate = flat2d(xc).T @ flat2d(dg)  # (D, F)
    dw_up = flat2d(xc).T @ flat2d(du)
    dx = dg @ wg.T + du @ wu.T  # (..., D)
    return tuple(t.astype(x.dtype) for t in (dx, dw_gate, dw_up, dw_down))


@jax.custom_vjp
def _swiglu(x, w_gate, w_up, w_down):
    g, u = _swiglu_gu(x, w_gate, w_up)
    return ((g * jax.nn.sigmoid(g) * u) @ w_down.astype(g.dtype)).astype(x.dtype)


def _swiglu_fwd(x, w_gate, w_up, w_down):
    g, u = _swiglu_gu(x, w_gate, w_up)
    y = ((g * jax.nn.sigmoid(g) * u) @ w_down.astype(g.dtype)).astype(x.dtype)
    return y, (x, w_gate, w_up, w_down, g, u)


def _swiglu_bwd(res, dy):
    x, w_gate, w_up, w_down, g, u = res
    return _swiglu_vjp(x, w_gate, w_up, w_down, g, u, dy)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _swiglu_inputs(fn, x, w_gate, w_up, w_down):
    named = (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down))
    arrays = {n: as_float(fn, n, a) for n, a in named}
    same_dtype(fn, **arrays)
    checks.swiglu(fn, *(a.shape for a in arrays.values()))
    return tuple(arrays.values())


def swiglu(x, w_gate, w_up, w_down, /):
    return _swiglu(*_swiglu_inputs("swiglu", x, w_gate, w_up, w_down))


def swiglu_backward(x, w_gate, w_up, w_down, dy, /):
    fn = "swiglu_backward"
    x, w_gate, w_up, w_down = _swiglu_inputs(fn, x, w_gate, w_up, w_down)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, (*x.shape[:-1], w_down.shape[1]), "swiglu's output")
    g, u = _swiglu_gu(x, w_gate, w_up)
    return _swiglu_vjp(x, w_gate, w_up, w_down, g, u, dy)


# -- RMSNorm ---------------------------------------------------------------------------------------


def _rms_r(x, eps):
    xc = x.astype(compute_dtype(x.dtype))
    return xc, jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)


def _rms_norm_vjp(x, weight, r, dy):
    xc = x.astype(r.dtype)
    n = xc * r
    dyc = dy.astype(r.dtype)
    g = dyc * weight.astype(r.dtype)
    dx = r * (g - n * jnp.mean(g * n, axis=-1, keepdims=True))
    dweight = flat2d(dyc * n).sum(axis=0)
    return dx.astype(x.dtype), dweight.astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, eps):
    xc, r = _rms_r(x, eps)
    # Llama's cast order: normalise in float32, cast to x.dtype, then scale by weight.
    return (xc * r).astype(x.dtype) * weight


def _rms_norm_fwd(x, weight, eps):
    xc, r = _rms_r(x, eps)
    return (xc * r).astype(x.dtype) * weight, (x, weight, r)


def _rms_norm_bwd(eps, res, dy):
    x, weight, r = res
    return _rms_norm_vjp(x, weight, r, dy)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _rms_inputs(fn, x, weight, eps):
    x, weight = as_float(fn, "x", x), as_float(fn, "weight", weight)
    same_dtype(fn, x=x, weight=weight)
    checks.rms_norm(fn, x.shape, weight.shape, static(fn, "eps", eps))
    return x, weight, float(eps)


def rms_norm(x, weight, /, *, eps=1e-6):
    return _rms_norm(*_rms_inputs("rms_norm", x, weight, eps))


def rms_norm_backward(x, weight, dy, /, *, eps=1e-6):
    fn = "rms_norm_backward"
    x, weight, eps = _rms_inputs(fn, x, weight, eps)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, x.shape, "x")
    return _rms_norm_vjp(x, weight, _rms_r(x, eps)[1], dy)


# -- attention -------------------------------------------------------------------------------------


def causal_mask(s, t, /):
    s = checks.check_positive_int("causal_mask", "s", static("causal_mask", "s", s), allow_zero=True)
    t = checks.check_positive_int("causal_mask", "t", static("causal_mask", "t", t), allow_zero=True)
    # Bottom-right: query i sees keys j <= i + t - s, so the last query sees all t keys.
    return jnp.arange(t)[None, :] <= jnp.arange(s)[:, None] + (t - s)  # (S, T)


def padding_mask(lengths, t, /):
    fn = "padding_mask"
    lengths = as_int(fn, "lengths", lengths)
    checks.check_rank(fn, "lengths", lengths.shape, "(B)")
    t = checks.check_positive_int(fn, "t", static(fn, "t", t), allow_zero=True)
    if lengths.size and not is_traced(lengths):  # a traced length is checked by no one: jit has no values
        lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
        if lo < 0 or hi > t:
            raise ValueError(f"{fn}: lengths must lie in [0, {t}], got min {lo} max {hi}")
    return (jnp.arange(t)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)


def _attention_probs(qg, k, allowed, scale):
    """qg (B, S, K, G, H), k (B, T, K, H) in the compute dtype → P (B, K, G, S, T)."""
    scores = jnp.einsum("bskgh,btkh->bkgst", qg, k) * scale  # (B, K, G, S, T)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    return _softmax_math(scores, -1)  # fully masked rows are zeros


def _grouped(q, k, v, K):
    B, S, N, H = q.shape
    cd = compute_dtype(q.dtype)
    return q.astype(cd).reshape(B, S, K, N // K, H), k.astype(cd), v.astype(cd)  # (B, S, K, G, H)


def _attention_vjp(q, k, v, p, dy, scale):
    B, S, N, H = q.shape
    K = k.shape[2]
    qg, kc, vc = _grouped(q, k, v, K)
    dyg = dy.astype(qg.dtype).reshape(B, S, K, N // K, H)  # (B, S, K, G, H)
    dv = jnp.einsum("bkgst,bskgh->btkh", p, dyg)  # the G query heads of a kv head add up
    dp = jnp.einsum("bskgh,btkh->bkgst", dyg, vc)  # (B, K, G, S, T)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    dq = jnp.einsum("bkgst,btkh->bskgh", ds, kc) * scale
    dk = jnp.einsum("bkgst,bskgh->btkh", ds, qg) * scale
    return dq.reshape(B, S, N, H).astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def _attention_out(p, v, shape, dtype):
    out = jnp.einsum("bkgst,btkh->bskgh", p, v)  # (B, S, K, G, H)
    return out.reshape(shape).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, allowed, scale):
    qg, kc, vc = _grouped(q, k, v, k.shape[2])
    return _attention_out(_attention_probs(qg, kc, allowed, scale), vc, q.shape, q.dtype)


def _attention_fwd(q, k, v, allowed, scale):
    qg, kc, vc = _grouped(q, k, v, k.shape[2])
    p = _attention_probs(qg, kc, allowed, scale)
    return _attention_out(p, vc, q.shape, q.dtype), (q, k, v, p)


def _attention_bwd(scale, res, dy):
    q, k, v, p = res
    return (*_attention_vjp(q, k, v, p, dy, scale), None)  # the mask gets no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_inputs(fn, q, k, v, causal, mask, scale):
    """Validates and returns (q, k, v, allowed, scale): allowed is bool, broadcastable to (B, K, G, S, T)."""
    q, k, v = as_float(fn, "q", q), as_float(fn, "k", k), as_float(fn, "v", v)
    same_dtype(fn, q=q, k=k, v=v)
    if mask is not None:
        mask = as_array(mask)
        checks.check_bool(fn, "mask", str(mask.dtype))
    _, S, T, N, K, H = checks.attention(
        fn, q.shape, k.shape, v.shape, None if mask is None else mask.shape, static(fn, "scale", scale)
    )
    if not isinstance(static(fn, "causal", causal), bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    allowed = None
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (B|1, N|1, S|1, T|1)
        b, n, s, t = m.shape
        allowed = m[:, None] if n == 1 else m.reshape(b, K, N // K, s, t)  # (B|1, K|1, G|1, S|1, T|1)
    if causal:
        c = causal_mask(S, T)  # (S, T)
        allowed = c if allowed is None else allowed & c
    return q, k, v, allowed, 1.0 / math.sqrt(H) if scale is None else float(scale)


def attention(q, k, v, /, *, causal=False, mask=None, scale=None):
    return _attention(*_attention_inputs("attention", q, k, v, causal, mask, scale))


def attention_backward(q, k, v, dy, /, *, causal=False, mask=None, scale=None):
    fn = "attention_backward"
    q, k, v, allowed, scale = _attention_inputs(fn, q, k, v, causal, mask, scale)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, q.shape, "q")
    qg, kc, _ = _grouped(q, k, v, k.shape[2])
    return _attention_vjp(q, k, v, _attention_probs(qg, kc, allowed, scale), dy, scale)
