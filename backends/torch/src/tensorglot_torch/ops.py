"""PyTorch ops: see the spec, `tensorglot.ops`.

Each differentiable op is a `torch.autograd.Function` whose backward is the spec's `_backward` formula,
written out (no autograd of built-ins inside); the public `*_backward` functions call the same code.
float16/bfloat16 are computed in float32 inside and cast back; tensors stay on their device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tensorglot import checks

from ._common import as_float, as_int, compute_dtype, flat2d, same_device, same_dtype
from .flash import flash_attention as flash_attention
from .flash import flash_attention_backward as flash_attention_backward

# -- softmax ---------------------------------------------------------------------------------------


def _softmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    xc = x.to(compute_dtype(x.dtype))
    if xc.shape[axis] == 0:
        return x.clone()
    y = torch.softmax(xc, axis)
    # torch.softmax gives NaN for an all -inf row, where the spec gives zeros. A NaN row is NaN in its
    # first entry, so only those rows (usually none) are checked for -inf, not the whole of x.
    if torch.isnan(y.narrow(axis, 0, 1)).any():
        y = y.masked_fill((xc == -math.inf).all(axis, keepdim=True), 0.0)
    return y.to(x.dtype)


def _softmax_grad(y: torch.Tensor, dy: torch.Tensor, axis: int) -> torch.Tensor:
    cd = compute_dtype(y.dtype)
    yc, dyc = y.to(cd), dy.to(cd)
    dx = dyc * yc
    dx.addcmul_(yc, dx.sum(axis, keepdim=True), value=-1.0)  # y·dy − y·sum(dy·y) = y·(dy − sum(dy·y))
    return dx.to(y.dtype)


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        y = _softmax(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _softmax_grad(y, dy, ctx.axis), None


def softmax(x, /, *, axis=-1):
    x = as_float("softmax", "x", x)
    return Softmax.apply(x, checks.normalize_axis("softmax", axis, x.ndim))


def softmax_backward(y, dy, /, *, axis=-1):
    fn = "softmax_backward"
    y, dy = as_float(fn, "y", y), as_float(fn, "dy", dy)
    checks.check_same_shape(fn, "dy", dy.shape, y.shape, "y")
    same_device(fn, y=y, dy=dy)
    return _softmax_grad(y, dy, checks.normalize_axis(fn, axis, y.ndim))


# -- linear ----------------------------------------------------------------------------------------


def _linear(x, w, b):
    cd = compute_dtype(x.dtype)
    x2 = flat2d(x.to(cd))  # (M, in)
    wc = w.to(cd)
    y = x2 @ wc if b is None else torch.addmm(b.to(cd), x2, wc)  # (M, out)
    return y.reshape(*x.shape[:-1], w.shape[1]).to(x.dtype)


def _linear_grads(x, w, dy, bias, needs=(True, True, True)):
    cd = compute_dtype(x.dtype)
    dy2 = flat2d(dy.to(cd))  # (M, out)
    dx = (dy2 @ w.to(cd).T).reshape(x.shape).to(x.dtype) if needs[0] else None
    dw = (flat2d(x.to(cd)).T @ dy2).to(x.dtype) if needs[1] else None
    db = dy2.sum(0).to(x.dtype) if bias and needs[2] else None
    return dx, dw, db


class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        return _linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return _linear_grads(x, w, dy, ctx.bias, ctx.needs_input_grad)


def _linear_inputs(fn, x, w, b):
    x, w = as_float(fn, "x", x), as_float(fn, "w", w)
    b = None if b is None else as_float(fn, "b", b)
    same_dtype(fn, x=x, w=w, b=b)
    checks.linear(fn, tuple(x.shape), tuple(w.shape), None if b is None else tuple(b.shape))
    return x, w, b


def linear(x, w, b=None, /):
    return Linear.apply(*_linear_inputs("linear", x, w, b))


def linear_backward(x, w, dy, /, *, bias):
    fn = "linear_backward"
    x, w, _ = _linear_inputs(fn, x, w, None)
    dy = as_float(fn, "dy", dy)
    same_dtype(fn, x=x, dy=dy)
    checks.check_same_shape(fn, "dy", tuple(dy.shape), (*x.shape[:-1], w.shape[1]), "linear's output")
    return _linear_grads(x, w, dy, bias)


# -- activations -----------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act(h, name):
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    return F.silu(h)


def _act_grad(h, name):
    """act'(h), written out."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        return cdf + h * torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
    s = torch.sigmoid(h)  # silu
    return s * (1.0 + h * (1.0 - s))


# -- MLPs ------------------------------------------------------------------------------------------


def _mlp(x, w_in, w_out, activation):
    """Returns (y, saved): saved is act(h) for relu (its sign is the derivative), else h."""
    cd = compute_dtype(x.dtype)
    h = flat2d(x.to(cd)) @ w_in.to(cd)  # (M, F)
    a = _act(h, activation)
    y = (a @ w_out.to(cd)).reshape(*x.shape[:-1], w_out.shape[1]).to(x.dtype)
    return y, (a if activation == "relu" else h)


def _mlp_grads(x, w_in, w_out, saved, dy, activation, needs=(True, True, True)):
    cd = compute_dtype(x.dtype)
    x2, dy2 = flat2d(x.to(cd)), flat2d(dy.to(cd))  # (M, D)
    w_in, w_out = w_in.to(cd), w_out.to(cd)
    if activation == "relu":
        a = saved
        dh = (dy2 @ w_out.T).masked_fill_(a <= 0, 0.0)  # (M, F); relu'(0) = 0
    else:
        a = _act(saved, activation)
        dh = (dy2 @ w_out.T).mul_(_act_grad(saved, activation))
    dw_out = (a.T @ dy2).to(x.dtype) if needs[2] else None  # (F, D)
    dw_in = (x2.T @ dh).to(x.dtype) if needs[1] else None  # (D, F)
    dx = (dh @ w_in.T).reshape(x.shape).to(x.dtype) if needs[0] else None
    return dx, dw_in, dw_out


class MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, activation):
        y, saved = _mlp(x, w_in, w_out, activation)
        ctx.save_for_backward(x, w_in, w_out, saved)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_in, w_out, saved = ctx.saved_tensors
        return *_mlp_grads(x, w_in, w_out, saved, dy, ctx.activation, ctx.needs_input_grad), None


def _mlp_inputs(fn, x, w_in, w_out, activation):
    x, w_in, w_out = as_float(fn, "x", x), as_float(fn, "w_in", w_in), as_float(fn, "w_out", w_out)
    same_dtype(fn, x=x, w_in=w_in, w_out=w_out)
    checks.mlp(fn, tuple(x.shape), tuple(w_in.shape), tuple(w_out.shape))
    checks.check_choice(fn, "activation", activation, checks.ACTIVATIONS)
    return x, w_in, w_out


def mlp(x, w_in, w_out, /, *, activation="relu"):
    return MLP.apply(*_mlp_inputs("mlp", x, w_in, w_out, activation), activation)


def mlp_backward(x, w_in, w_out, dy, /, *, activation="relu"):
    fn = "mlp_backward"
    x, w_in, w_out = _mlp_inputs(fn, x, w_in, w_out, activation)
    dy = as_float(fn, "dy", dy)
    same_dtype(fn, x=x, dy=dy)
    checks.check_same_shape(fn, "dy", tuple(dy.shape), (*x.shape[:-1], w_out.shape[1]), "mlp's output")
    _, saved = _mlp(x, w_in, w_out, activation)  # the pre-activation, recomputed from x
    return _mlp_grads(x, w_in, w_out, saved, dy, activation)


def _swiglu(x, w_gate, w_up, w_down):
    cd = compute_dtype(x.dtype)
    x2 = flat2d(x.to(cd))  # (M, D)
    g, u = x2 @ w_gate.to(cd), x2 @ w_up.to(cd)  # (M, F)
    y = (F.silu(g) * u) @ w_down.to(cd)
    return y.reshape(*x.shape[:-1], w_down.shape[1]).to(x.dtype), g, u


def _swiglu_grads(x, w_gate, w_up, w_down, g, u, dy, needs=(True, True, True, True)):
    cd = compute_dtype(x.dtype)
    x2, dy2 = flat2d(x.to(cd)), flat2d(dy.to(cd))
    wg, wu, wd = w_gate.to(cd), w_up.to(cd), w_down.to(cd)
    s = F.silu(g)
    da = dy2 @ wd.T  # (M, F)
    dg = da * u * _act_grad(g, "silu")
    du = da * s
    out = x.dtype
    dw_down = ((s * u).T @ dy2).to(out) if needs[3] else None
    dw_gate = (x2.T @ dg).to(out) if needs[1] else None
    dw_up = (x2.T @ du).to(out) if needs[2] else None
    dx = torch.addmm(dg @ wg.T, du, wu.T).reshape(x.shape).to(out) if needs[0] else None
    return dx, dw_gate, dw_up, dw_down


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        y, g, u = _swiglu(x, w_gate, w_up, w_down)
        ctx.save_for_backward(x, w_gate, w_up, w_down, g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
        return _swiglu_grads(x, w_gate, w_up, w_down, g, u, dy, ctx.needs_input_grad)


def _swiglu_inputs(fn, x, w_gate, w_up, w_down):
    named = {"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    t = {n: as_float(fn, n, a) for n, a in named.items()}
    same_dtype(fn, **t)
    checks.swiglu(fn, *(tuple(a.shape) for a in t.values()))
    return tuple(t.values())


def swiglu(x, w_gate, w_up, w_down, /):
    return SwiGLU.apply(*_swiglu_inputs("swiglu", x, w_gate, w_up, w_down))


def swiglu_backward(x, w_gate, w_up, w_down, dy, /):
    fn = "swiglu_backward"
    x, w_gate, w_up, w_down = _swiglu_inputs(fn, x, w_gate, w_up, w_down)
    dy = as_float(fn, "dy", dy)
    same_dtype(fn, x=x, dy=dy)
    checks.check_same_shape(fn, "dy", tuple(dy.shape), (*x.shape[:-1], w_down.shape[1]), "swiglu's output")
    _, g, u = _swiglu(x, w_gate, w_up, w_down)
    return _swiglu_grads(x, w_gate, w_up, w_down, g, u, dy)


# -- RMSNorm ---------------------------------------------------------------------------------------


def _rms(x, eps):
    """(x in the compute dtype, r = rsqrt(mean(x²) + eps)) with r of shape (..., 1)."""
    xc = x.to(compute_dtype(x.dtype))
    return xc, torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_grads(x, weight, r, dy, needs=(True, True)):
    cd = compute_dtype(x.dtype)
    n = x.to(cd) * r
    g = dy.to(cd) * weight.to(cd)
    dx = (r * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype) if needs[0] else None
    dweight = flat2d(dy.to(cd) * n).sum(0).to(x.dtype) if needs[1] else None
    return dx, dweight


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xc, r = _rms(x, eps)
        ctx.save_for_backward(x, weight, r)
        # Llama's cast order: normalise in float32, cast to x.dtype, then scale by weight.
        return (xc * r).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        return *_rms_norm_grads(x, weight, r, dy, ctx.needs_input_grad), None


def _rms_inputs(fn, x, weight, eps):
    x, weight = as_float(fn, "x", x), as_float(fn, "weight", weight)
    same_dtype(fn, x=x, weight=weight)
    checks.rms_norm(fn, tuple(x.shape), tuple(weight.shape), eps)
    return x, weight, float(eps)


def rms_norm(x, weight, /, *, eps=1e-6):
    return RMSNorm.apply(*_rms_inputs("rms_norm", x, weight, eps))


def rms_norm_backward(x, weight, dy, /, *, eps=1e-6):
    fn = "rms_norm_backward"
    x, weight, eps = _rms_inputs(fn, x, weight, eps)
    dy = as_float(fn, "dy", dy)
    same_dtype(fn, x=x, dy=dy)
    checks.check_same_shape(fn, "dy", tuple(dy.shape), tuple(x.shape), "x")
    return _rms_norm_grads(x, weight, _rms(x, eps)[1], dy)


# -- attention -------------------------------------------------------------------------------------


def causal_mask(s, t, /):
    s = checks.check_positive_int("causal_mask", "s", s, allow_zero=True)
    t = checks.check_positive_int("causal_mask", "t", t, allow_zero=True)
    return _causal_mask(s, t, None)


def _causal_mask(s, t, device):
    # Bottom-right: query i sees keys j <= i + t - s, so the last query sees all t keys.
    i = torch.arange(s, device=device)[:, None]
    return torch.arange(t, device=device)[None, :] <= i + (t - s)  # (S, T)


def padding_mask(lengths, t, /):
    fn = "padding_mask"
    lengths = as_int(fn, "lengths", lengths)
    checks.check_rank(fn, "lengths", tuple(lengths.shape), "(B)")
    t = checks.check_positive_int(fn, "t", t, allow_zero=True)
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > t):
        raise ValueError(f"{fn}: lengths must lie in [0, {t}], got min {int(lengths.min())} max {int(lengths.max())}")
    keys = torch.arange(t, device=lengths.device)
    return (keys[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)


#: Causal attention runs in blocks of query rows: a block reads only the keys some row of it can see,
#: so about half of the (S, T) scores are never computed, and a block's scores stay in cache.
_BLOCK = 64


def _blocks(S, T, causal):
    """(i0, i1, t1): query rows [i0, i1) and the keys [0, t1) any of them can see."""
    if not causal:
        return [(0, S, T)]
    return [(i0, min(S, i0 + _BLOCK), max(0, min(T, i0 + _BLOCK + T - S))) for i0 in range(0, S, _BLOCK)]


def _attention(q, k, v, causal, mask, scale):
    """Forward in the compute dtype: returns (out (B, S, N, H), and what backward keeps)."""
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    G = N // K
    cd = compute_dtype(q.dtype)

    def heads(x):  # (B, L, N|K, H) → (B·N, L, H); query head h reads kv head h // G
        x = x.to(cd).transpose(1, 2)  # (B, N|K, L, H)
        if x.shape[1] != N:
            x = x[:, :, None].expand(B, K, G, x.shape[2], H)  # (B, K, G, L, H), copied by the reshape
        return x.reshape(B * N, x.shape[-2], H)

    qs, kh, vh = heads(q).mul(scale).contiguous(), heads(k), heads(v)  # (B·N, S|T, H); heads may view q
    m = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (B|1, N|1, S|1, T|1)
    ps, outs, bounds = [], [], _blocks(S, T, causal)
    for i0, i1, t1 in bounds:
        p = _block_probs(qs, kh, m, causal, (B, N, S, T), i0, i1, t1)
        outs.append(torch.bmm(p, vh[:, :t1]))  # (B·N, C, H)
        ps.append(p)
    out = torch.cat(outs, 1).view(B, N, S, H).transpose(1, 2).to(q.dtype)  # (B, S, N, H)
    return out, (qs, kh, vh, bounds, ps, K)


def _block_probs(qs, kh, m, causal, sizes, i0, i1, t1):
    """P for query rows [i0, i1) against keys [0, t1): (B·N, i1 − i0, t1)."""
    B, N, S, T = sizes
    scores = torch.bmm(qs[:, i0:i1], kh[:, :t1].transpose(1, 2))  # (B·N, C, t1)
    rows = torch.arange(i0, i1, device=qs.device)[:, None] + (T - S)  # query i sees keys j <= i + T − S
    if m is not None:
        allowed = m[:, :, i0:i1] if m.shape[2] != 1 else m
        allowed = allowed[..., :t1] if allowed.shape[3] != 1 else allowed
        if causal:
            allowed = allowed & (torch.arange(t1, device=qs.device) <= rows)
        allowed = allowed.expand(B, N, i1 - i0, t1).reshape(B * N, i1 - i0, t1)
        p = torch.softmax(scores.masked_fill_(~allowed, -math.inf), -1)
        return p.masked_fill_(~allowed.any(-1, keepdim=True), 0.0)  # a query that sees no key: zeros, not NaN
    if causal:
        c0 = max(0, i0 + T - S + 1)  # keys before c0 are visible to every row of the block
        if c0 < t1:
            scores[..., c0:].masked_fill_(torch.arange(c0, t1, device=qs.device) > rows, -math.inf)
    p = torch.softmax(scores, -1)
    if causal and i0 < S - T:  # rows i < S − T see no key
        p[:, : min(i1, S - T) - i0] = 0.0
    return p


def _attention_grads(saved, dy, scale, dtype, needs=(True, True, True)):
    qs, kh, vh, bounds, ps, K = saved
    BN, S, H = qs.shape
    B, N, T = dy.shape[0], dy.shape[2], kh.shape[1]
    dyh = dy.to(qs.dtype).transpose(1, 2).reshape(BN, S, H)  # (B·N, S, H)
    dk, dv, dqs = torch.zeros_like(kh), torch.zeros_like(vh), []
    for (i0, i1, t1), p in zip(bounds, ps):
        dy_b = dyh[:, i0:i1]  # (B·N, C, H)
        dv[:, :t1] += torch.bmm(p.transpose(1, 2), dy_b)
        dp = torch.bmm(dy_b, vh[:, :t1].transpose(1, 2))  # (B·N, C, t1)
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)  # P ⊙ (dP − rowsum(dP ⊙ P))
        dqs.append(torch.bmm(ds, kh[:, :t1]))
        dk[:, :t1] += torch.bmm(ds.transpose(1, 2), qs[:, i0:i1])  # qs carries the scale
    dq = (torch.cat(dqs, 1).mul_(scale).view(B, N, S, H).transpose(1, 2).to(dtype)) if needs[0] else None

    def kv(g, need):  # (B·N, T, H) → (B, T, K, H): the G query heads of a kv head add up
        if not need:
            return None
        g = g.view(B, K, N // K, T, H)
        g = g[:, :, 0] if N == K else g.sum(2)
        return g.transpose(1, 2).to(dtype)

    return dq, kv(dk, needs[1]), kv(dv, needs[2])


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale):
        out, (qs, kh, vh, bounds, ps, K) = _attention(q, k, v, causal, mask, scale)
        ctx.save_for_backward(qs, kh, vh, *ps)
        ctx.bounds, ctx.scale, ctx.K = bounds, scale, K
        return out

    @staticmethod
    def backward(ctx, dy):
        qs, kh, vh, *ps = ctx.saved_tensors
        grads = _attention_grads((qs, kh, vh, ctx.bounds, ps, ctx.K), dy, ctx.scale, dy.dtype, ctx.needs_input_grad)
        return *grads, None, None, None


def _attention_inputs(fn, q, k, v, causal, mask, scale):
    q, k, v = as_float(fn, "q", q), as_float(fn, "k", k), as_float(fn, "v", v)
    same_dtype(fn, q=q, k=k, v=v)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask, device=q.device)
        checks.check_bool(fn, "mask", str(mask.dtype).removeprefix("torch."))
        same_device(fn, q=q, mask=mask)
    checks.attention(
        fn, tuple(q.shape), tuple(k.shape), tuple(v.shape), None if mask is None else tuple(mask.shape), scale
    )
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return q, k, v, causal, mask, scale


def attention(q, k, v, /, *, causal=False, mask=None, scale=None):
    q, k, v, causal, mask, scale = _attention_inputs("attention", q, k, v, causal, mask, scale)
    return Attention.apply(q, k, v, causal, mask, scale)


def attention_backward(q, k, v, dy, /, *, causal=False, mask=None, scale=None):
    fn = "attention_backward"
    q, k, v, causal, mask, scale = _attention_inputs(fn, q, k, v, causal, mask, scale)
    dy = as_float(fn, "dy", dy)
    same_dtype(fn, q=q, dy=dy)
    checks.check_same_shape(fn, "dy", tuple(dy.shape), tuple(q.shape), "q")
    _, saved = _attention(q, k, v, causal, mask, scale)
    return _attention_grads(saved, dy, scale, q.dtype)
