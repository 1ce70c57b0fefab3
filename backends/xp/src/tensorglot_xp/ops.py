"""Array API kernels: see the spec, `tensorglot.ops` (the front ends) and `tensorglot.kernels` (the rules).

Every kernel takes its namespace from its first array (`tensorglot.kernels.namespace`) and uses only the
standard's functions; the one gap, erf, is filled in `special`. Kernels build new arrays (in-place updates are
optional in the standard; JAX has none); only the cache's write, in `layers`, updates in place where it can.
"""

from __future__ import annotations

import math

from tensorglot.kernels import device, is_lazy, namespace, softcapped, visible_keys_mask

from .special import erf


def _weight_grad(a, b):
    """``aᵀ b`` summed over every leading axis: (..., m), (..., n) → (m, n)."""
    lead = tuple(range(a.ndim - 1))
    return namespace(a).tensordot(a, b, axes=(lead, lead))


def _mm(x, w):
    """x (..., k) @ w (k, n) as one 2-D matmul: NumPy loops a stacked one over x (1.5x slower at (B, 1, D))."""
    xp = namespace(x)
    return xp.reshape(xp.matmul(xp.reshape(x, (-1, x.shape[-1])), w), (*x.shape[:-1], w.shape[-1]))


# -- softmax ---------------------------------------------------------------------------------------


def softmax(x, axis):
    if x.shape[axis] == 0:  # no key (T = 0): nothing to normalise, and max has no identity
        return x
    xp = namespace(x)
    top = xp.max(x, axis=axis, keepdims=True)  # NaN anywhere makes it NaN, and so the row
    if not is_lazy(top) and bool(xp.all(xp.isfinite(top))):  # the usual case, in 7 arrays, not 27
        e = xp.exp(x - top)
        return e / xp.sum(e, axis=axis, keepdims=True)  # the same bits as below: each row's total is >= 1
    # A +inf maximum: the limit weighs the +inf entries alike (exp(0)) and the rest 0 (exp(−inf)).
    # An all −inf row: shifting by 0 leaves exp(−inf) = 0 everywhere, and the sum 0 gives zeros below.
    limit = xp.where(x == xp.inf, xp.zeros_like(x), -xp.inf)
    e = xp.exp(xp.where(top == xp.inf, limit, x - xp.where(xp.isinf(top), 0.0, top)))
    total = xp.sum(e, axis=axis, keepdims=True)
    return e / xp.where(total == 0.0, 1.0, total)


def softmax_backward(y, dy, axis):
    return y * (dy - namespace(y).sum(y * dy, axis=axis, keepdims=True))


# -- linear ----------------------------------------------------------------------------------------


def linear(x, w, b):
    y = _mm(x, w)  # (..., out)
    return y if b is None else y + b


def linear_backward(x, w, dy, bias):
    xp = namespace(x)
    db = xp.sum(dy, axis=tuple(range(dy.ndim - 1))) if bias else None
    return xp.matmul(dy, xp.matrix_transpose(w)), _weight_grad(x, dy), db


# -- activations: each gives act(h) and a function of no argument that gives act'(h) ------------------


def _activation(h, name):
    """(act(h), () → act'(h)) of relu (act'(0) taken as 0), gelu, gelu_tanh or silu; a forward skips act'."""
    xp = namespace(h)
    if name == "relu":
        return xp.maximum(h, 0.0), lambda: xp.astype(h > 0.0, h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + erf(h / math.sqrt(2.0)))
        return h * cdf, lambda: cdf + h * xp.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = xp.tanh(c * (h + 0.044715 * h**3))
        return 0.5 * h * (1.0 + t), lambda: 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * h * h)
    z = xp.exp(-xp.abs(h))  # silu's sigmoid, never overflowing: 1/(1 + e^−h) for h ≥ 0, e^h/(1 + e^h) below
    s = xp.where(h >= 0.0, 1.0, z) / (1.0 + z)
    return h * s, lambda: s * (1.0 + h * (1.0 - s))


# -- MLPs ------------------------------------------------------------------------------------------


def mlp(x, w_in, w_out, activation):
    return _mm(_activation(_mm(x, w_in), activation)[0], w_out)


def mlp_backward(x, w_in, w_out, dy, activation):
    xp = namespace(x)
    a, da = _activation(xp.matmul(x, w_in), activation)  # the pre-activation, recomputed
    dh = xp.matmul(dy, xp.matrix_transpose(w_out)) * da()  # (..., F)
    return xp.matmul(dh, xp.matrix_transpose(w_in)), _weight_grad(x, dh), _weight_grad(a, dy)


def gated_mlp(x, w_gate, w_up, w_down, activation):
    a, _ = _activation(_mm(x, w_gate), activation)  # (..., F)
    return _mm(a * _mm(x, w_up), w_down)


def gated_mlp_backward(x, w_gate, w_up, w_down, dy, activation):
    xp = namespace(x)
    up = xp.matmul(x, w_up)  # (..., F)
    s, ds = _activation(xp.matmul(x, w_gate), activation)
    da = xp.matmul(dy, xp.matrix_transpose(w_down))
    dg, du = da * up * ds(), da * s
    dx = xp.matmul(dg, xp.matrix_transpose(w_gate)) + xp.matmul(du, xp.matrix_transpose(w_up))
    return dx, _weight_grad(x, dg), _weight_grad(x, du), _weight_grad(s * up, dy)


# -- norms -----------------------------------------------------------------------------------------


def _rms(x, eps):
    xp = namespace(x)
    return xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)


def rms_norm(x, weight, eps, round_to, offset=0.0):
    xp = namespace(x)
    n = x / _rms(x, eps)  # a division, not a product by 1/rms: a scalar costs strict 3 arrays
    if round_to is not None:  # Llama's cast order: the normalised x is rounded to the input dtype first
        n = xp.astype(xp.astype(n, getattr(xp, round_to)), x.dtype)
    return n * (weight + offset if offset else weight)


def rms_norm_backward(x, weight, dy, eps, offset=0.0):
    xp = namespace(x)
    r = 1.0 / _rms(x, eps)
    n, g = x * r, dy * (weight + offset if offset else weight)
    return r * (g - n * xp.mean(g * n, axis=-1, keepdims=True)), xp.sum(dy * n, axis=tuple(range(x.ndim - 1)))


def _standardised(x, eps):
    centred = x - namespace(x).mean(x, axis=-1, keepdims=True)
    r = 1.0 / _rms(centred, eps)  # (..., 1)
    return centred * r, r


def layer_norm(x, weight, bias, eps):
    y = _standardised(x, eps)[0] * weight
    return y if bias is None else y + bias


def layer_norm_backward(x, weight, dy, eps, bias):
    xp, (n, r), g, lead = namespace(x), _standardised(x, eps), dy * weight, tuple(range(x.ndim - 1))
    dx = r * (g - xp.mean(g, axis=-1, keepdims=True) - n * xp.mean(g * n, axis=-1, keepdims=True))
    return dx, xp.sum(dy * n, axis=lead), xp.sum(dy, axis=lead) if bias else None


# -- attention: heads grouped as (B, K, G, S, H), G = N // K query heads per kv head ------------------


def group_queries(x, kv_heads):
    """(B, S, N, H) → (B, K, G, S, H)."""
    (B, S, N, H), xp = x.shape, namespace(x)
    return xp.permute_dims(xp.reshape(x, (B, S, kv_heads, N // kv_heads, H)), (0, 2, 3, 1, 4))


def ungroup_queries(x):
    """(B, K, G, S, H) → (B, S, N, H)."""
    (B, K, G, S, H), xp = x.shape, namespace(x)
    return xp.reshape(xp.permute_dims(x, (0, 3, 1, 2, 4)), (B, S, K * G, H))


def kv_heads_first(x):
    """(B, T, K, H) ↔ (B, K, T, H)."""
    return namespace(x).permute_dims(x, (0, 2, 1, 3))


def kv_grouped(x):
    """(B, T, K, H) → (B, K, 1, T, H), which broadcasts over the G query heads of each kv head."""
    return namespace(x).expand_dims(kv_heads_first(x), axis=2)


def grouped_mask(mask, kv_heads):
    """A (B|1, N|1, S|1, T|1) mask as (B|1, K|1, G|1, S|1, T|1), so it broadcasts against grouped scores."""
    b, n, s, t = mask.shape
    return namespace(mask).reshape(mask, (b, 1, 1, s, t) if n == 1 else (b, kv_heads, n // kv_heads, s, t))


def visible(causal, mask, rows, cols, offset, window=None):
    """Where query ``rows[i]`` may attend key ``cols[j]`` (None: everywhere); causal is bottom-right,
    ``offset`` = T − S, and a ``window`` W also hides the keys at or before the diagonal minus W."""
    if not causal:
        return mask
    see = visible_keys_mask(rows, cols, offset, window)  # (S, T)
    return see if mask is None else see & mask


def _probs(q, k, causal, mask, scale, softcap, window):
    """qg (B, K, G, S, H) with the scale in it, the probabilities (B, K, G, S, T) and the cap's derivative."""
    xp = namespace(q)
    S, T, K = q.shape[1], k.shape[1], k.shape[2]
    qg = group_queries(q * scale, K)
    scores, dcap = softcapped(xp.matmul(qg, xp.matrix_transpose(kv_grouped(k))), softcap)  # (B, K, G, S, T)
    hides = causal and (S > 1 or (window is not None and window < T))  # else one query sees all T keys
    rows, cols = (xp.arange(S, device=device(q)), xp.arange(T, device=device(q))) if hides else (None, None)
    allowed = visible(hides, None if mask is None else grouped_mask(mask, K), rows, cols, T - S, window)
    scores = scores if allowed is None else xp.where(allowed, scores, -xp.inf)
    return qg, softmax(scores, -1), dcap  # a query that sees nothing: zeros


def attention(q, k, v, causal, mask, scale, softcap=None, window=None):
    _, p, _ = _probs(q, k, causal, mask, scale, softcap, window)
    return ungroup_queries(namespace(q).matmul(p, kv_grouped(v)))  # (B, S, N, H)


def attention_backward(q, k, v, dy, causal, mask, scale, softcap=None, window=None):
    xp = namespace(q)
    qg, p, dcap = _probs(q, k, causal, mask, scale, softcap, window)
    dyg = group_queries(dy, k.shape[2])  # (B, K, G, S, H)
    dv = xp.sum(xp.matmul(xp.matrix_transpose(p), dyg), axis=2)  # (B, K, T, H): the G heads of a kv head add up
    ds = softmax_backward(p, xp.matmul(dyg, xp.matrix_transpose(kv_grouped(v))), -1)  # (B, K, G, S, T)
    if dcap is not None:
        ds = ds * dcap  # through the cap to the raw scores
    dq = xp.matmul(ds, kv_grouped(k)) * scale
    dk = xp.sum(xp.matmul(xp.matrix_transpose(ds), qg), axis=2)  # qg carries the scale
    return ungroup_queries(dq), kv_heads_first(dk), kv_heads_first(dv)
