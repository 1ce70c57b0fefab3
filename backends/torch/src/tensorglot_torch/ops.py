"""PyTorch kernels: see the spec, `tensorglot.ops` (the front ends) and `tensorglot.kernels` (the rules).

Each differentiable kernel is a `torch.autograd.Function` whose backward runs the explicit backward
kernel's formula (no autograd of built-ins inside); the ``*_backward`` kernels call the same code.
Inputs arrive validated and in the compute dtype (float32 or float64); tensors stay on their device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tensorglot.kernels import softcapped, visible_keys

from ._common import DTYPES
from ._common import kernel as _kernel
from .encodings import rope as rope
from .flash import flash_attention as flash_attention
from .flash import flash_attention_backward as flash_attention_backward
from .prepack import matmul as _mm

ALL = (True,) * 4  # every gradient: what the explicit backward kernels compute


def _flat2d(x):
    """(..., n) → (prod(...), n), for weight gradients that sum over every leading axis."""
    return x.reshape(-1, x.shape[-1])


# -- softmax ---------------------------------------------------------------------------------------


def _softmax(x, axis):
    y = torch.softmax(x, axis)
    # torch.softmax gives a NaN row where the row maximum is ±inf (or x has a NaN), and such a row is NaN
    # in its first entry: only then (usually never) are the rows fixed. Meta tensors hold no values to fix;
    # a compiled graph fixes them always (no branch on data, and the compiler fuses the fix).
    if not y.shape[axis] or y.is_meta:
        return y
    if torch.compiler.is_compiling() or math.isnan(y.select(axis, 0).sum()):
        m = x.amax(axis, keepdim=True)  # NaN where x has a NaN: such a row stays NaN
        top = (x == math.inf).to(x.dtype)  # a +inf maximum: the limit gives the +inf entries equal weight
        y = torch.where(m == math.inf, top / top.sum(axis, keepdim=True), y.masked_fill(m == -math.inf, 0.0))
    return y


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
        return softmax_backward(y, dy, ctx.axis), None


def softmax_backward(y, dy, axis):
    dx = dy * y
    return dx.addcmul_(y, dx.sum(axis, keepdim=True), value=-1.0)  # y·dy − y·sum(dy·y)


# -- linear ----------------------------------------------------------------------------------------


class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        if b is None:
            return _mm(x, w)  # (..., out); matmul folds the leading axes into one mm
        return torch.addmm(b, _flat2d(x), w).reshape(*x.shape[:-1], w.shape[1])  # (..., out)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return linear_backward(x, w, dy, ctx.bias, ctx.needs_input_grad)


def linear_backward(x, w, dy, bias, needs=ALL):
    dy2 = _flat2d(dy)  # (M, out)
    dx = dy @ w.T if needs[0] else None  # (..., in)
    dw = _flat2d(x).T @ dy2 if needs[1] else None
    return dx, dw, dy2.sum(0) if bias and needs[2] else None


# -- activations -----------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


_ACT = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "silu": F.silu}


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


def _mlp_saved(x, w_in, activation):
    """What the backward needs of the forward: act(h) for relu (its sign is the derivative), else the
    pre-activation h; h = x @ w_in, (M, F)."""
    h = _mm(_flat2d(x), w_in)  # (M, F)
    return h.relu_() if activation == "relu" else h


def _mlp(x, w_in, w_out, activation):
    """(y, saved), saved as `_mlp_saved` makes it."""
    saved = _mlp_saved(x, w_in, activation)
    a = saved if activation == "relu" else _ACT[activation](saved)
    return _mm(a, w_out).reshape(*x.shape[:-1], w_out.shape[1]), saved


def mlp_backward(x, w_in, w_out, dy, activation, saved=None, needs=ALL):
    """``saved``: what the forward kept (see `_mlp_saved`), recomputed from x when None (x @ w_in only: the
    output product is not needed)."""
    saved = _mlp_saved(x, w_in, activation) if saved is None else saved
    dh = _flat2d(dy) @ w_out.T  # (M, F)
    if activation == "relu":
        a = saved
        # dh ← 0 where a <= 0 (relu'(0) = 0), in place: one pass, against masked_fill_'s bool temporary and
        # its several times slower kernel (the MLP backward's largest cost after its products)
        torch.ops.aten.threshold_backward.grad_input(dh, a, 0.0, grad_input=dh)
    else:
        a = _ACT[activation](saved)
        dh.mul_(_act_grad(saved, activation))
    dx = (dh @ w_in.T).reshape(x.shape) if needs[0] else None
    return dx, _flat2d(x).T @ dh if needs[1] else None, a.T @ _flat2d(dy) if needs[2] else None


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
        return *mlp_backward(x, w_in, w_out, dy, ctx.activation, saved, ctx.needs_input_grad), None


def _gated(x, w_gate, w_up, w_down, activation):
    x2 = _flat2d(x)  # (M, D)
    g, u = _mm(x2, w_gate), _mm(x2, w_up)  # (M, F)
    return _mm(_ACT[activation](g).mul_(u), w_down).reshape(*x.shape[:-1], w_down.shape[1]), g, u


def _gated_backward(x, w_gate, w_up, w_down, dy, activation, gu=None, needs=ALL):
    """``gu``: the forward's (x @ w_gate, x @ w_up), recomputed when None."""
    x2, dy2 = _flat2d(x), _flat2d(dy)
    g, u = (x2 @ w_gate, x2 @ w_up) if gu is None else gu  # (M, F); the output product is not needed
    s = _ACT[activation](g)
    da = dy2 @ w_down.T  # (M, F)
    dg, du = da * u * _act_grad(g, activation), da.mul_(s)
    dx = torch.addmm(dg @ w_gate.T, du, w_up.T).reshape(x.shape) if needs[0] else None
    dw_gate = x2.T @ dg if needs[1] else None
    dw_up = x2.T @ du if needs[2] else None
    return dx, dw_gate, dw_up, s.mul_(u).T @ dy2 if needs[3] else None


class GatedMLP(torch.autograd.Function):
    """``(act(x @ w_gate) * (x @ w_up)) @ w_down``: SwiGLU with silu, GeGLU with gelu_tanh."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, activation):
        y, g, u = _gated(x, w_gate, w_up, w_down, activation)
        ctx.save_for_backward(x, w_gate, w_up, w_down, g, u)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
        return *_gated_backward(x, w_gate, w_up, w_down, dy, ctx.activation, (g, u), ctx.needs_input_grad), None


#: The gated-MLP kernels behind ``swiglu`` (activation silu) and ``geglu`` (gelu_tanh).
gated_mlp = _kernel(GatedMLP)
gated_mlp_backward = _gated_backward


# -- RMSNorm ---------------------------------------------------------------------------------------


def _rsqrt_ms(x, eps):
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)


def rms_norm_backward(x, weight, dy, eps, offset=0.0, r=None, needs=ALL):
    """``r``: the forward's rsqrt(mean(x²) + eps), recomputed when None."""
    r = _rsqrt_ms(x, eps) if r is None else r
    n = x * r
    g = dy * (weight + offset if offset else weight)
    dx = r * (g - n * (g * n).mean(-1, keepdim=True)) if needs[0] else None
    return dx, _flat2d(dy * n).sum(0) if needs[1] else None


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, round_to, offset=0.0):
        r = _rsqrt_ms(x, eps)
        ctx.save_for_backward(x, weight, r)
        ctx.offset = offset
        n = x * r
        if round_to is not None:  # Llama's cast order: the normalised x is rounded to the input dtype first
            n = n.to(DTYPES[round_to]).to(x.dtype)
        return n.mul_(weight + offset if offset else weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        return *rms_norm_backward(x, weight, dy, None, ctx.offset, r, ctx.needs_input_grad), None, None, None


# -- LayerNorm -------------------------------------------------------------------------------------


def _standardise(x, eps):
    """((x − mean) · r, r), r = rsqrt(biased variance + eps), over the last axis."""
    xc = x - x.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return xc.mul_(r), r


def layer_norm_backward(x, weight, dy, eps, bias, needs=ALL):
    n, r = _standardise(x, eps)
    g = dy * weight
    dx = r * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True)) if needs[0] else None
    dw = _flat2d(dy * n).sum(0) if needs[1] else None
    return dx, dw, _flat2d(dy).sum(0) if bias and needs[2] else None


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.bias = eps, bias is not None
        y = _standardise(x, eps)[0].mul_(weight)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return *layer_norm_backward(x, weight, dy, ctx.eps, ctx.bias, ctx.needs_input_grad), None


# -- attention -------------------------------------------------------------------------------------

#: Causal attention runs in blocks of query rows: a block reads only the keys some row of it can see
#: (after the causal diagonal or before a sliding window: none), so about half of the (S, T) scores are
#: never computed, and a block's scores stay in cache.
_BLOCK = 64


def _blocks(S, T, causal, window):
    """(i0, i1, t0, t1): query rows [i0, i1) and the keys [t0, t1) any of them can see."""
    if not causal or S == 0:  # S = 0: one empty block, so the output is (B, 0, N, H)
        return [(0, S, 0, T)]
    ends = [(i0, min(S, i0 + _BLOCK)) for i0 in range(0, S, _BLOCK)]
    return [(i0, i1, *visible_keys(i0, i1, S, T, True, window)) for i0, i1 in ends]


def _attention(q, k, v, causal, mask, scale, softcap=None, window=None, with_out=True):
    """(out (B, S, N, H), what the backward keeps); ``with_out=False``: only the latter (out is None), for the
    standalone backward, which needs the probabilities but not P·V."""
    B, S, N, H = q.shape
    T, K, G = k.shape[1], k.shape[2], N // k.shape[2]

    def heads(x):  # (B, L, N|K, H) → (B·N, L, H); query head h reads kv head h // G
        x = x.transpose(1, 2)  # (B, N|K, L, H)
        if x.shape[1] != N:
            x = x[:, :, None].expand(B, K, G, x.shape[2], H)  # (B, K, G, L, H), copied by the reshape
        return x.reshape(B * N, x.shape[-2], H)

    qs, kh, vh = heads(q).mul(scale).contiguous(), heads(k), heads(v)  # (B·N, S|T, H); q scaled first
    ps, outs, bounds = [], [], _blocks(S, T, causal, window)
    for i0, i1, t0, t1 in bounds:
        p = _block_probs(qs, kh, mask, causal, window, softcap, (B, N, S, T), i0, i1, t0, t1)
        if with_out:
            outs.append(torch.bmm(p, vh[:, t0:t1]))  # (B·N, C, H)
        ps.append(p)
    out = torch.cat(outs, 1).view(B, N, S, H).transpose(1, 2) if with_out else None  # (B, S, N, H)
    return out, (qs, kh, vh, bounds, ps, K, softcap)


def _capped_scores(qs, kh, softcap, i0, i1, t0, t1):
    """Q Kᵀ of rows [i0, i1) and keys [t0, t1), capped: (scores, the cap's derivative or None)."""
    return softcapped(torch.bmm(qs[:, i0:i1], kh[:, t0:t1].transpose(1, 2)), softcap)  # (B·N, C, t1 − t0)


def _block_probs(qs, kh, mask, causal, window, softcap, sizes, i0, i1, t0, t1):
    """P for query rows [i0, i1) against keys [t0, t1): (B·N, i1 − i0, t1 − t0); softmax's rules fix rows that
    see no key (zeros) and rows whose scores overflowed to +inf."""
    B, N, S, T = sizes
    scores = _capped_scores(qs, kh, softcap, i0, i1, t0, t1)[0]
    hidden = None
    if causal:  # query i sees keys j <= i + T − S, and with a window only j > i + T − S − W
        rows = torch.arange(i0, i1, device=qs.device)[:, None] + (T - S)
        cols = torch.arange(t0, t1, device=qs.device)
        hidden = cols > rows if window is None else (cols > rows) | (cols <= rows - window)
    if mask is not None:
        allowed = mask[:, :, i0:i1] if mask.shape[2] != 1 else mask  # (B|1, N|1, C|1, T|1)
        allowed = allowed[..., t0:t1] if allowed.shape[3] != 1 else allowed
        if hidden is not None:
            allowed = allowed & ~hidden
        scores.view(B, N, i1 - i0, t1 - t0).masked_fill_(~allowed, -math.inf)
    elif hidden is not None:
        scores.masked_fill_(hidden, -math.inf)
    return _softmax(scores, -1)


def _attention_grads(saved, dy, scale, needs=ALL):
    qs, kh, vh, bounds, ps, K, softcap = saved
    BN, S, H = qs.shape
    B, N, T = dy.shape[0], dy.shape[2], kh.shape[1]
    dyh = dy.transpose(1, 2).reshape(BN, S, H)  # (B·N, S, H)
    dk, dv, dqs = torch.zeros_like(kh), torch.zeros_like(vh), []
    for (i0, i1, t0, t1), p in zip(bounds, ps):
        dy_b = dyh[:, i0:i1]  # (B·N, C, H)
        dv[:, t0:t1] += torch.bmm(p.transpose(1, 2), dy_b)
        dp = torch.bmm(dy_b, vh[:, t0:t1].transpose(1, 2))  # (B·N, C, t1 − t0)
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)  # P ⊙ (dP − rowsum(dP ⊙ P))
        if softcap is not None:  # through the cap: the scores are recomputed rather than kept
            ds.mul_(_capped_scores(qs, kh, softcap, i0, i1, t0, t1)[1])
        dqs.append(torch.bmm(ds, kh[:, t0:t1]))
        dk[:, t0:t1] += torch.bmm(ds.transpose(1, 2), qs[:, i0:i1])  # qs carries the scale
    dq = torch.cat(dqs, 1).mul_(scale).view(B, N, S, H).transpose(1, 2) if needs[0] else None

    def kv(g, need):  # (B·N, T, H) → (B, T, K, H): the G query heads of a kv head add up
        g = g.view(B, K, N // K, T, H)
        return (g[:, :, 0] if N == K else g.sum(2)).transpose(1, 2) if need else None

    return dq, kv(dk, needs[1]), kv(dv, needs[2])


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale, softcap=None, window=None):
        out, (qs, kh, vh, bounds, ps, K, softcap) = _attention(q, k, v, causal, mask, scale, softcap, window)
        ctx.save_for_backward(qs, kh, vh, *ps)
        ctx.bounds, ctx.scale, ctx.K, ctx.softcap = bounds, scale, K, softcap
        return out

    @staticmethod
    def backward(ctx, dy):
        qs, kh, vh, *ps = ctx.saved_tensors
        saved = (qs, kh, vh, ctx.bounds, ps, ctx.K, ctx.softcap)
        return *_attention_grads(saved, dy, ctx.scale, ctx.needs_input_grad), None, None, None, None, None


def attention_backward(q, k, v, dy, causal, mask, scale, softcap=None, window=None):
    return _attention_grads(_attention(q, k, v, causal, mask, scale, softcap, window, with_out=False)[1], dy, scale)


softmax, linear, mlp = _kernel(Softmax), _kernel(Linear), _kernel(MLP)
rms_norm, layer_norm, _attention_function = _kernel(RMSNorm), _kernel(LayerNorm), _kernel(Attention)


def attention(q, k, v, causal, mask, scale, softcap=None, window=None):
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.shape[1] != 1 or grad:
        return _attention_function(q, k, v, causal, mask, scale, softcap, window)
    return _decode_attention(q, k, v, causal, mask, scale, softcap, window)


def _decode_attention(q, k, v, causal, mask, scale, softcap, window):
    """A decoding step: one query per sequence sees every key (causal is bottom-right), or the last W, where
    the mask (B|1, N|1, 1, T|1) lets it (a paged pool's rows of other lengths: the general path would copy
    every key G-fold by head, most of such a step's time).

    A cache's keys arrive as a (B, T, K, H) view of its kv-head-major storage (K, slots, H), so as (K·B, T, H)
    they are a view too: the G query heads of kv head k meet its keys of each sequence in one product,
    (G, H) · (H, T), and no key is copied or read G times. Keys of another layout are copied once.
    """
    B, _, N, H = q.shape
    K = k.shape[2]
    G = N // K
    if window is not None and causal:
        k, v = k[:, -window:], v[:, -window:]  # (B, min(W, T), K, H)
        mask = mask if mask is None or mask.shape[3] == 1 else mask[..., -window:]
    T = k.shape[1]
    kh, vh = (x.permute(2, 0, 1, 3).reshape(K * B, T, H) for x in (k, v))  # (K·B, T, H)
    qh = q.reshape(B, K, G, H).transpose(0, 1).reshape(K * B, G, H) * scale  # (K·B, G, H)
    scores = torch.bmm(qh, kh.transpose(1, 2))  # (K·B, G, T)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:  # (B|1, N|1, T|1) as (K|1, B|1, G|1, T|1) against (K, B, G, T)
        b, n, t = mask.shape[0], mask.shape[1], mask.shape[3]
        m = mask[:, :, 0].reshape(b, K if n > 1 else 1, G if n > 1 else 1, t).transpose(0, 1)
        scores = scores.view(K, B, G, T).masked_fill(~m, -math.inf).view(K * B, G, T)
    out = torch.bmm(_softmax(scores, -1), vh)  # (K·B, G, H)
    return out.view(K, B, G, H).transpose(0, 1).reshape(B, 1, N, H)
