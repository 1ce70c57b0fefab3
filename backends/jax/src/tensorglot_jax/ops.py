"""JAX kernels: see the spec, `tensorglot.ops` (the front ends) and `tensorglot.kernels` (the rules).

Each differentiable kernel is a jitted `jax.custom_vjp` (`_common.vjp_kernel`): its fwd keeps the residuals
the backward needs (softmax: its output; MLPs: the pre-activations; RMSNorm: the inverse RMS; attention:
the probabilities) and its bwd runs the formula the explicit ``*_backward`` kernel runs. Options are
static; branches are `jnp.where`, so everything traces under `jax.jit`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from tensorglot.kernels import softcapped, visible_keys_mask

from ._common import flat2d, vjp_kernel
from .encodings import rope as rope
from .flash import flash_attention as flash_attention
from .flash import flash_attention_backward as flash_attention_backward
from .layers import autograd_value_and_grad as autograd_value_and_grad
from .layers import cache_write as cache_write
from .layers import cross_entropy as cross_entropy
from .layers import cross_entropy_backward as cross_entropy_backward
from .layers import embedding as embedding
from .layers import embedding_backward as embedding_backward

# -- softmax ---------------------------------------------------------------------------------------


def _softmax(x, axis):
    if x.shape[axis] == 0:  # no key (T = 0): nothing to normalise, and max has no identity
        return x
    m = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(x - jnp.where(jnp.isinf(m), 0.0, m))  # an all −inf row: exp(−inf) = 0 everywhere
    e = jnp.where(m == jnp.inf, (x == jnp.inf).astype(x.dtype), e)  # a +inf maximum: its +inf entries share
    s = jnp.sum(e, axis=axis, keepdims=True)
    return jnp.where(s == 0, 0.0, e / s)  # s == 0 only for an all −inf row; NaN rows stay NaN


def _softmax_grad(y, dy, axis):
    return y * (dy - jnp.sum(dy * y, axis=axis, keepdims=True))


def _softmax_fwd(x, axis):
    y = _softmax(x, axis)
    return y, y


softmax = vjp_kernel(_softmax_fwd, lambda axis, y, dy: (_softmax_grad(y, dy, axis),), (1,))
softmax_backward = jax.jit(_softmax_grad, static_argnums=2)

# -- linear ----------------------------------------------------------------------------------------


def _linear_grads(x, w, dy, bias):
    dx = dy @ w.T  # (..., in)
    dw = flat2d(x).T @ flat2d(dy)  # (in, out)
    return dx, dw, flat2d(dy).sum(axis=0) if bias else None


def _linear_fwd(x, w, b):
    y = x @ w  # (..., out)
    return (y if b is None else y + b), (x, w, b)


linear = vjp_kernel(_linear_fwd, lambda res, dy: _linear_grads(res[0], res[1], dy, res[2] is not None), ())
linear_backward = jax.jit(_linear_grads, static_argnums=3)

# -- activations -----------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _activation(h, name):
    """(act(h), act'(h))."""
    if name == "relu":
        return jnp.maximum(h, 0), (h > 0).astype(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + jax.lax.erf(h / math.sqrt(2.0)))
        return h * cdf, cdf + h * jnp.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        t = jnp.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
        return 0.5 * h * (1.0 + t), grad
    s = jax.nn.sigmoid(h)  # silu
    return h * s, s * (1.0 + h * (1.0 - s))


# -- MLPs ------------------------------------------------------------------------------------------


def _mlp_grads(dy, activation, x, w_in, w_out, h):
    a, da_dh = _activation(h, activation)
    dh = (dy @ w_out.T) * da_dh  # (..., F)
    return dh @ w_in.T, flat2d(x).T @ flat2d(dh), flat2d(a).T @ flat2d(dy)


def _mlp_fwd(x, w_in, w_out, activation):
    h = x @ w_in  # (..., F)
    return _activation(h, activation)[0] @ w_out, (x, w_in, w_out, h)


mlp = vjp_kernel(_mlp_fwd, lambda activation, res, dy: _mlp_grads(dy, activation, *res), (3,))


@partial(jax.jit, static_argnums=4)
def mlp_backward(x, w_in, w_out, dy, activation):
    return _mlp_grads(dy, activation, x, w_in, w_out, x @ w_in)


def _gated_grads(activation, dy, x, w_gate, w_up, w_down, g, u):
    s, ds_dg = _activation(g, activation)
    da = dy @ w_down.T  # (..., F)
    dg, du = da * u * ds_dg, da * s
    dx = dg @ w_gate.T + du @ w_up.T  # (..., D)
    return dx, flat2d(x).T @ flat2d(dg), flat2d(x).T @ flat2d(du), flat2d(s * u).T @ flat2d(dy)


def _gated_fwd(x, w_gate, w_up, w_down, activation):
    g, u = x @ w_gate, x @ w_up  # (..., F)
    return (_activation(g, activation)[0] * u) @ w_down, (x, w_gate, w_up, w_down, g, u)


gated_mlp = vjp_kernel(_gated_fwd, lambda activation, res, dy: _gated_grads(activation, dy, *res), (4,))


@partial(jax.jit, static_argnums=5)
def gated_mlp_backward(x, w_gate, w_up, w_down, dy, activation):
    return _gated_grads(activation, dy, x, w_gate, w_up, w_down, x @ w_gate, x @ w_up)


# -- RMSNorm ---------------------------------------------------------------------------------------


def _rsqrt_ms(x, eps):
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)


def _rms_norm_grads(dy, x, weight, offset, r):
    n, g = x * r, dy * (weight + offset if offset else weight)
    return r * (g - n * jnp.mean(g * n, axis=-1, keepdims=True)), flat2d(dy * n).sum(axis=0)


def _rms_norm_fwd(x, weight, eps, round_to, offset):
    r = _rsqrt_ms(x, eps)
    n = x * r
    if round_to is not None:  # Llama's cast order: the normalised x is rounded to the input dtype first
        n = n.astype(round_to).astype(x.dtype)
    return n * (weight + offset if offset else weight), (x, weight, r)


_rms_norm = vjp_kernel(
    _rms_norm_fwd, lambda eps, round_to, offset, res, dy: _rms_norm_grads(dy, res[0], res[1], offset, res[2]), (2, 3, 4)
)


def rms_norm(x, weight, eps, round_to, offset=0.0):
    return _rms_norm(x, weight, eps, round_to, offset)


@partial(jax.jit, static_argnums=(3, 4))
def _rms_norm_backward(x, weight, dy, eps, offset):
    return _rms_norm_grads(dy, x, weight, offset, _rsqrt_ms(x, eps))


def rms_norm_backward(x, weight, dy, eps, offset=0.0):
    return _rms_norm_backward(x, weight, dy, eps, offset)


# -- LayerNorm -------------------------------------------------------------------------------------


def _standardise(x, eps):
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)
    return xc * r, r


def _layer_norm_grads(dy, x, weight, eps, bias):
    n, r = _standardise(x, eps)
    g = dy * weight
    dx = r * (g - jnp.mean(g, axis=-1, keepdims=True) - n * jnp.mean(g * n, axis=-1, keepdims=True))
    return dx, flat2d(dy * n).sum(axis=0), flat2d(dy).sum(axis=0) if bias else None


def _layer_norm_fwd(x, weight, bias, eps):
    y = _standardise(x, eps)[0] * weight
    return (y if bias is None else y + bias), (x, weight, bias)


layer_norm = vjp_kernel(
    _layer_norm_fwd, lambda eps, res, dy: _layer_norm_grads(dy, res[0], res[1], eps, res[2] is not None), (3,)
)
layer_norm_backward = jax.jit(lambda x, w, dy, eps, bias: _layer_norm_grads(dy, x, w, eps, bias), static_argnums=(3, 4))


# -- attention -------------------------------------------------------------------------------------


# Scores are laid out (B, K, S, G, T), the order XLA's batched matmul of (B, S, K, G, H) by (B, T, K, H)
# produces, so no (S, T)-sized transpose is ever made (about 1.2× faster on CPU than (B, K, G, S, T)).


def _scores(qg, k, softcap):
    """The capped scores (B, K, S, G, T) and the cap's derivative 1 − tanh² (None without a cap)."""
    return softcapped(jnp.einsum("bskgh,btkh->bksgt", qg, k), softcap)  # an overflow is +inf: softmax's rule


def _probs(q, k, causal, mask, scale, softcap, window):
    """qg (B, S, K, G, H) carrying the scale and the probabilities p (B, K, S, G, T)."""
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    qg = (q * scale).reshape(B, S, K, N // K, H)  # (B, S, K, G, H)
    scores = _scores(qg, k, softcap)[0]
    allowed = None
    if mask is not None:
        b, n, s, t = mask.shape
        grouped = mask.reshape(b, K, N // K, s, t).transpose(0, 1, 3, 2, 4) if n > 1 else mask[:, :, :, None]
        allowed = grouped  # (B|1, K|1, S|1, G|1, T|1)
    if causal:
        c = visible_keys_mask(jnp.arange(S), jnp.arange(T), T - S, window)  # (S, T), bottom-right
        allowed = c[:, None, :] if allowed is None else allowed & c[:, None, :]  # (S, 1, T)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    return qg, _softmax(scores, -1)  # a query that sees nothing: zeros


def _attention_grads(dy, scale, softcap, qg, k, v, p):
    B, S, K, G, H = qg.shape
    dyg = dy.reshape(B, S, K, G, H)  # (B, S, K, G, H)
    dv = jnp.einsum("bksgt,bskgh->btkh", p, dyg)  # the G query heads of a kv head add up
    dp = jnp.einsum("bskgh,btkh->bksgt", dyg, v)  # (B, K, S, G, T)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    if softcap is not None:
        ds = ds * _scores(qg, k, softcap)[1]  # through the cap, its scores recomputed rather than kept
    dq = jnp.einsum("bksgt,btkh->bskgh", ds, k) * scale
    dk = jnp.einsum("bksgt,bskgh->btkh", ds, qg)  # qg carries the scale
    return dq.reshape(B, S, K * G, H), dk, dv


def _attention_fwd(q, k, v, causal, mask, scale, softcap, window):
    qg, p = _probs(q, k, causal, mask, scale, softcap, window)
    return jnp.einsum("bksgt,btkh->bskgh", p, v).reshape(q.shape), (qg, k, v, p)


_attention = vjp_kernel(
    _attention_fwd,
    lambda causal, scale, softcap, window, res, dy: (*_attention_grads(dy, scale, softcap, *res), None),
    (3, 5, 6, 7),
)


def attention(q, k, v, causal, mask, scale, softcap=None, window=None):
    return _attention(q, k, v, causal, mask, scale, softcap, window)


@partial(jax.jit, static_argnums=(4, 6, 7, 8))
def _attention_backward(q, k, v, dy, causal, mask, scale, softcap, window):
    qg, p = _probs(q, k, causal, mask, scale, softcap, window)
    return _attention_grads(dy, scale, softcap, qg, k, v, p)


def attention_backward(q, k, v, dy, causal, mask, scale, softcap=None, window=None):
    return _attention_backward(q, k, v, dy, causal, mask, scale, softcap, window)
