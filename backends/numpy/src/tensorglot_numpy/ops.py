"""NumPy ops: see the spec, `tensorglot.ops`. This is the reference the other backends are tested against."""

from __future__ import annotations

import math

import numpy as np

from tensorglot import checks

from ._common import as_float, as_int, compute_dtype, flat2d, same_dtype
from .flash import flash_attention as flash_attention
from .flash import flash_attention_backward as flash_attention_backward

# -- softmax ---------------------------------------------------------------------------------------


def softmax(x, /, *, axis=-1):
    x = as_float("softmax", "x", x)
    axis = checks.normalize_axis("softmax", axis, x.ndim)
    xc = x.astype(compute_dtype(x.dtype), copy=False)
    if xc.shape[axis] == 0:
        return x.copy()
    m = np.max(xc, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)  # an all -inf row: exp(-inf) = 0 everywhere, handled below
    e = np.exp(xc - m)
    s = np.sum(e, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(s == 0, 0.0, e / s)  # s == 0 only for an all -inf row; NaN rows keep NaN
    return y.astype(x.dtype, copy=False)


def softmax_backward(y, dy, /, *, axis=-1):
    y = as_float("softmax_backward", "y", y)
    dy = as_float("softmax_backward", "dy", dy)
    checks.check_same_shape("softmax_backward", "dy", dy.shape, y.shape, "y")
    axis = checks.normalize_axis("softmax_backward", axis, y.ndim)
    cd = compute_dtype(y.dtype)
    yc, dyc = y.astype(cd, copy=False), dy.astype(cd, copy=False)
    dx = yc * (dyc - np.sum(dyc * yc, axis=axis, keepdims=True))
    return dx.astype(y.dtype, copy=False)


# -- linear ----------------------------------------------------------------------------------------


def linear(x, w, b=None, /):
    fn = "linear"
    x, w = as_float(fn, "x", x), as_float(fn, "w", w)
    b = None if b is None else as_float(fn, "b", b)
    dtype = same_dtype(fn, x=x, w=w, b=b)
    checks.linear(fn, x.shape, w.shape, None if b is None else b.shape)
    cd = compute_dtype(dtype)
    y = x.astype(cd, copy=False) @ w.astype(cd, copy=False)  # (..., out)
    if b is not None:
        y += b.astype(cd, copy=False)
    return y.astype(dtype, copy=False)


def linear_backward(x, w, dy, /, *, bias):
    fn = "linear_backward"
    x, w, dy = as_float(fn, "x", x), as_float(fn, "w", w), as_float(fn, "dy", dy)
    dtype = same_dtype(fn, x=x, w=w, dy=dy)
    checks.linear(fn, x.shape, w.shape, None)
    checks.check_same_shape(fn, "dy", dy.shape, (*x.shape[:-1], w.shape[1]), "linear's output")
    cd = compute_dtype(dtype)
    xc, wc, dyc = (a.astype(cd, copy=False) for a in (x, w, dy))
    dx = dyc @ wc.T  # (..., in)
    dw = flat2d(xc).T @ flat2d(dyc)  # (in, out)
    db = flat2d(dyc).sum(axis=0) if bias else None
    return dx.astype(dtype, copy=False), dw.astype(dtype, copy=False), None if db is None else db.astype(dtype)


# -- activations -----------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_erf = np.frompyfunc(math.erf, 1, 1)  # NumPy has no erf; math.erf is exact to double precision


def _sigmoid(h):
    return np.exp(-np.logaddexp(0.0, -h))


def _activation(h, name):
    """(act(h), act'(h)), in h's dtype."""
    if name == "relu":
        return np.maximum(h, 0), (h > 0).astype(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(h / math.sqrt(2.0)).astype(h.dtype))
        pdf = np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        return h * cdf, cdf + h * pdf
    if name == "gelu_tanh":
        t = np.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
        return 0.5 * h * (1.0 + t), grad
    s = _sigmoid(h)  # silu
    return h * s, s * (1.0 + h * (1.0 - s))


# -- MLPs ------------------------------------------------------------------------------------------


def _mlp_inputs(fn, x, w_in, w_out, activation):
    x, w_in, w_out = as_float(fn, "x", x), as_float(fn, "w_in", w_in), as_float(fn, "w_out", w_out)
    dtype = same_dtype(fn, x=x, w_in=w_in, w_out=w_out)
    checks.mlp(fn, x.shape, w_in.shape, w_out.shape)
    checks.check_choice(fn, "activation", activation, checks.ACTIVATIONS)
    cd = compute_dtype(dtype)
    return dtype, x.astype(cd, copy=False), w_in.astype(cd, copy=False), w_out.astype(cd, copy=False)


def mlp(x, w_in, w_out, /, *, activation="relu"):
    dtype, x, w_in, w_out = _mlp_inputs("mlp", x, w_in, w_out, activation)
    h = x @ w_in  # (..., F)
    if activation == "relu":
        np.maximum(h, 0, out=h)  # in place: the hot path keeps one (..., F) temporary
    else:
        h = _activation(h, activation)[0]
    return (h @ w_out).astype(dtype, copy=False)


def mlp_backward(x, w_in, w_out, dy, /, *, activation="relu"):
    fn = "mlp_backward"
    dtype, xc, w_in_c, w_out_c = _mlp_inputs(fn, x, w_in, w_out, activation)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, (*xc.shape[:-1], w_out_c.shape[1]), "mlp's output")
    dyc = dy.astype(xc.dtype, copy=False)
    h = xc @ w_in_c  # (..., F)
    a, da_dh = _activation(h, activation)
    dw_out = flat2d(a).T @ flat2d(dyc)  # (F, D)
    dh = dyc @ w_out_c.T
    dh *= da_dh  # (..., F)
    dw_in = flat2d(xc).T @ flat2d(dh)  # (D, F)
    dx = dh @ w_in_c.T  # (..., D)
    return tuple(g.astype(dtype, copy=False) for g in (dx, dw_in, dw_out))


def _swiglu_inputs(fn, x, w_gate, w_up, w_down):
    arrays = {n: as_float(fn, n, a) for n, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down))}
    dtype = same_dtype(fn, **arrays)
    checks.swiglu(fn, *(a.shape for a in arrays.values()))
    cd = compute_dtype(dtype)
    return dtype, *(a.astype(cd, copy=False) for a in arrays.values())


def swiglu(x, w_gate, w_up, w_down, /):
    dtype, x, w_gate, w_up, w_down = _swiglu_inputs("swiglu", x, w_gate, w_up, w_down)
    g = x @ w_gate  # (..., F)
    a = g * _sigmoid(g) * (x @ w_up)
    return (a @ w_down).astype(dtype, copy=False)


def swiglu_backward(x, w_gate, w_up, w_down, dy, /):
    fn = "swiglu_backward"
    dtype, xc, wg, wu, wd = _swiglu_inputs(fn, x, w_gate, w_up, w_down)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, (*xc.shape[:-1], wd.shape[1]), "swiglu's output")
    dyc = dy.astype(xc.dtype, copy=False)
    g, u = xc @ wg, xc @ wu  # (..., F)
    s, ds_dg = _activation(g, "silu")
    a = s * u
    dw_down = flat2d(a).T @ flat2d(dyc)
    da = dyc @ wd.T
    dg = da * u * ds_dg
    du = da * s
    dw_gate = flat2d(xc).T @ flat2d(dg)
    dw_up = flat2d(xc).T @ flat2d(du)
    dx = dg @ wg.T + du @ wu.T
    return tuple(t.astype(dtype, copy=False) for t in (dx, dw_gate, dw_up, dw_down))


# -- RMSNorm ---------------------------------------------------------------------------------------


def _rms_inputs(fn, x, weight, eps):
    x, weight = as_float(fn, "x", x), as_float(fn, "weight", weight)
    dtype = same_dtype(fn, x=x, weight=weight)
    checks.rms_norm(fn, x.shape, weight.shape, eps)
    xc = x.astype(compute_dtype(dtype), copy=False)
    r = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)
    return dtype, xc, weight, r


def rms_norm(x, weight, /, *, eps=1e-6):
    dtype, xc, weight, r = _rms_inputs("rms_norm", x, weight, eps)
    # Llama's cast order: normalise in float32, cast to x.dtype, then scale by weight.
    return (xc * r).astype(dtype, copy=False) * weight


def rms_norm_backward(x, weight, dy, /, *, eps=1e-6):
    fn = "rms_norm_backward"
    dtype, xc, weight, r = _rms_inputs(fn, x, weight, eps)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, xc.shape, "x")
    dyc = dy.astype(xc.dtype, copy=False)
    n = xc * r
    g = dyc * weight.astype(xc.dtype, copy=False)
    dx = r * (g - n * np.mean(g * n, axis=-1, keepdims=True))
    dweight = flat2d(dyc * n).sum(axis=0)
    return dx.astype(dtype, copy=False), dweight.astype(dtype, copy=False)


# -- attention -------------------------------------------------------------------------------------


def causal_mask(s, t, /):
    s = checks.check_positive_int("causal_mask", "s", s, allow_zero=True)
    t = checks.check_positive_int("causal_mask", "t", t, allow_zero=True)
    # Bottom-right: query i sees keys j <= i + t - s, so the last query sees all t keys.
    return np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s)  # (S, T)


def padding_mask(lengths, t, /):
    fn = "padding_mask"
    lengths = as_int(fn, "lengths", lengths)
    checks.check_rank(fn, "lengths", lengths.shape, "(B)")
    t = checks.check_positive_int(fn, "t", t, allow_zero=True)
    if lengths.size and (lengths.min() < 0 or lengths.max() > t):
        raise ValueError(f"{fn}: lengths must lie in [0, {t}], got min {lengths.min()} max {lengths.max()}")
    return (np.arange(t)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)


def _attention_probs(fn, q, k, v, causal, mask, scale):
    """Shared by forward and backward: returns the compute-dtype inputs, the grouped probabilities and sizes."""
    q, k, v = as_float(fn, "q", q), as_float(fn, "k", k), as_float(fn, "v", v)
    dtype = same_dtype(fn, q=q, k=k, v=v)
    if mask is not None:
        mask = np.asarray(mask)
        checks.check_bool(fn, "mask", str(mask.dtype))
    B, S, T, N, K, H = checks.attention(fn, q.shape, k.shape, v.shape, None if mask is None else mask.shape, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    G = N // K
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    cd = compute_dtype(dtype)
    qg = q.astype(cd, copy=False).reshape(B, S, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, S, H)
    kh = k.astype(cd, copy=False).transpose(0, 2, 1, 3)[:, :, None]  # (B, K, 1, T, H)
    vh = v.astype(cd, copy=False).transpose(0, 2, 1, 3)[:, :, None]  # (B, K, 1, T, H)
    scores = (qg @ kh.swapaxes(-1, -2)) * scale  # (B, K, G, S, T)
    allowed = None
    if causal:
        allowed = causal_mask(S, T)  # (S, T)
    if mask is not None:
        m = np.broadcast_to(mask, (B, N, S, T)).reshape(B, K, G, S, T)
        allowed = m if allowed is None else (m & allowed)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    p = softmax(scores, axis=-1)  # fully masked rows are zeros
    return dtype, scale, qg, kh, vh, p, (B, S, T, N, K, G, H)


def attention(q, k, v, /, *, causal=False, mask=None, scale=None):
    dtype, _, _, _, vh, p, (B, S, _, N, _, _, H) = _attention_probs("attention", q, k, v, causal, mask, scale)
    out = p @ vh  # (B, K, G, S, H)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, N, H).astype(dtype, copy=False)


def attention_backward(q, k, v, dy, /, *, causal=False, mask=None, scale=None):
    fn = "attention_backward"
    dtype, scale, qg, kh, vh, p, (B, S, _, N, K, G, H) = _attention_probs(fn, q, k, v, causal, mask, scale)
    dy = as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, (B, S, N, H), "q")
    dyg = dy.astype(qg.dtype, copy=False).reshape(B, S, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, S, H)
    dv = (p.swapaxes(-1, -2) @ dyg).sum(axis=2)  # (B, K, T, H): the G query heads of a kv head add up
    dp = dyg @ vh.swapaxes(-1, -2)  # (B, K, G, S, T)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    dq = (ds @ kh) * scale  # (B, K, G, S, H)
    dk = (ds.swapaxes(-1, -2) @ qg).sum(axis=2) * scale  # (B, K, T, H)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)
    return (
        dq.astype(dtype, copy=False),
        dk.transpose(0, 2, 1, 3).astype(dtype, copy=False),
        dv.transpose(0, 2, 1, 3).astype(dtype, copy=False),
    )
