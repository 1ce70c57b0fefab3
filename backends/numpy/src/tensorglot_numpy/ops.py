"""NumPy kernels: see the spec, `tensorglot.ops` (the front ends) and `tensorglot.kernels` (the rules).

This is the reference the other backends are tested against: every kernel gets validated arrays in the
compute dtype (float32 or float64) and writes the math out, forward and backward.
"""

from __future__ import annotations

import math

import numpy as np

from tensorglot.kernels import softcapped, visible_keys_mask

from .encodings import rope as rope
from .flash import flash_attention as flash_attention
from .flash import flash_attention_backward as flash_attention_backward


def _flat2d(x):
    """(..., n) → (prod(...), n), for weight gradients that sum over every leading axis."""
    return x.reshape(-1, x.shape[-1])


# -- softmax ---------------------------------------------------------------------------------------


def softmax(x, axis):
    if x.shape[axis] == 0:  # no key (T = 0): nothing to normalise, and max has no identity
        return x
    m = np.max(x, axis=axis, keepdims=True)
    top = np.isposinf(m)
    m = np.where(np.isinf(m), 0.0, m)  # an all −inf row: exp(−inf) = 0 everywhere, handled below
    e = np.exp(x - m)
    if top.any():  # a +inf maximum: the limit gives the +inf entries equal weight
        e = np.where(top, (x == np.inf).astype(x.dtype), e)
    s = np.sum(e, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s == 0, 0.0, e / s).astype(x.dtype, copy=False)  # s == 0 only for an all −inf row


def softmax_backward(y, dy, axis):
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


# -- linear ----------------------------------------------------------------------------------------


def linear(x, w, b):
    y = x @ w  # (..., out)
    return y if b is None else y + b


def linear_backward(x, w, dy, bias):
    dx = dy @ w.T  # (..., in)
    dw = _flat2d(x).T @ _flat2d(dy)  # (in, out)
    return dx, dw, _flat2d(dy).sum(axis=0) if bias else None


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


def mlp(x, w_in, w_out, activation):
    h = x @ w_in  # (..., F)
    if activation == "relu":
        np.maximum(h, 0, out=h)  # in place: the hot path keeps one (..., F) temporary
    else:
        h = _activation(h, activation)[0]
    return h @ w_out


def mlp_backward(x, w_in, w_out, dy, activation):
    h = x @ w_in  # (..., F), recomputed
    a, da_dh = _activation(h, activation)
    dw_out = _flat2d(a).T @ _flat2d(dy)  # (F, D)
    dh = dy @ w_out.T
    dh *= da_dh  # (..., F)
    return dh @ w_in.T, _flat2d(x).T @ _flat2d(dh), dw_out


def gated_mlp(x, w_gate, w_up, w_down, activation):
    g = x @ w_gate  # (..., F)
    return (_activation(g, activation)[0] * (x @ w_up)) @ w_down


def gated_mlp_backward(x, w_gate, w_up, w_down, dy, activation):
    g, u = x @ w_gate, x @ w_up  # (..., F)
    s, ds_dg = _activation(g, activation)
    da = dy @ w_down.T
    dg, du = da * u * ds_dg, da * s
    dx = dg @ w_gate.T + du @ w_up.T
    return dx, _flat2d(x).T @ _flat2d(dg), _flat2d(x).T @ _flat2d(du), _flat2d(s * u).T @ _flat2d(dy)


# -- norms -----------------------------------------------------------------------------------------


def _rsqrt_ms(x, eps):
    return 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)


def rms_norm(x, weight, eps, round_to, offset=0.0):
    n = x * _rsqrt_ms(x, eps)
    if round_to is not None:  # Llama's cast order: the normalised x is rounded to the input dtype first
        n = n.astype(round_to).astype(x.dtype)
    return n * (weight + offset if offset else weight)


def rms_norm_backward(x, weight, dy, eps, offset=0.0):
    r = _rsqrt_ms(x, eps)
    n, g = x * r, dy * (weight + offset if offset else weight)
    dx = r * (g - n * np.mean(g * n, axis=-1, keepdims=True))
    return dx, _flat2d(dy * n).sum(axis=0)


def _standardise(x, eps):
    """((x − mean) · r, r) with r = rsqrt(biased var + eps), over the last axis."""
    xc = x - np.mean(x, axis=-1, keepdims=True)
    r = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)
    return xc * r, r


def layer_norm(x, weight, bias, eps):
    y = _standardise(x, eps)[0] * weight
    return y if bias is None else y + bias


def layer_norm_backward(x, weight, dy, eps, bias):
    n, r = _standardise(x, eps)
    g = dy * weight
    dx = r * (g - np.mean(g, axis=-1, keepdims=True) - n * np.mean(g * n, axis=-1, keepdims=True))
    return dx, _flat2d(dy * n).sum(axis=0), _flat2d(dy).sum(axis=0) if bias else None


# -- attention -------------------------------------------------------------------------------------


def _visible(S, T, causal, window):
    """(S, T) bool, where query i may see key j (bottom-right causal, the window counting back), or None."""
    return visible_keys_mask(np.arange(S), np.arange(T), T - S, window) if causal else None


def _probs(q, k, v, causal, mask, scale, softcap, window):
    """The grouped inputs, probabilities and the cap's derivative: qg (B, K, G, S, H) carrying the scale,
    kh, vh, p (B, K, G, S, T), dcap (like p, or None)."""
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    G = N // K
    qg = (q * scale).reshape(B, S, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, S, H)
    kh = k.transpose(0, 2, 1, 3)[:, :, None]  # (B, K, 1, T, H)
    vh = v.transpose(0, 2, 1, 3)[:, :, None]
    with np.errstate(over="ignore"):  # an overflow is +inf, which softmax's rule handles
        scores, dcap = softcapped(qg @ kh.swapaxes(-1, -2), softcap)  # (B, K, G, S, T)
    allowed = _visible(S, T, causal, window)
    if mask is not None:
        m = np.broadcast_to(mask, (B, N, S, T)).reshape(B, K, G, S, T)
        allowed = m if allowed is None else (m & allowed)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    return qg, kh, vh, softmax(scores, -1), dcap  # a query that sees nothing: zeros


def attention(q, k, v, causal, mask, scale, softcap=None, window=None):
    B, S, N, H = q.shape
    _, _, vh, p, _ = _probs(q, k, v, causal, mask, scale, softcap, window)
    return (p @ vh).transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)  # (B, S, N, H)


def attention_backward(q, k, v, dy, causal, mask, scale, softcap=None, window=None):
    B, S, N, H = q.shape
    K = k.shape[2]
    qg, kh, vh, p, dcap = _probs(q, k, v, causal, mask, scale, softcap, window)
    dyg = dy.reshape(B, S, K, N // K, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, S, H)
    dv = (p.swapaxes(-1, -2) @ dyg).sum(axis=2)  # (B, K, T, H): the G query heads of a kv head add up
    dp = dyg @ vh.swapaxes(-1, -2)  # (B, K, G, S, T)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    if dcap is not None:
        ds *= dcap  # through the cap to the raw scores
    dq = (ds @ kh) * scale  # (B, K, G, S, H)
    dk = (ds.swapaxes(-1, -2) @ qg).sum(axis=2)  # (B, K, T, H); qg carries the scale
    return dq.transpose(0, 3, 1, 2, 4).reshape(B, S, N, H), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
