"""PyTorch blockwise (flash) attention kernels: see the spec, `tensorglot.ops.flash_attention`.

One `torch.autograd.Function`: the forward keeps q, k, v, the output and the log-sum-exp; the backward
lays them out for its tiles and recomputes each tile's probabilities from them.

The forward's memory is O(block_size²) beyond its inputs and output: each query tile is laid out and
scaled on its own, k and v are read in place where the layout allows (B = 1) and the output is written in
the caller's (B, S, N, H) layout, so no whole-size copy of q, k, v or the output is made.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tensorglot.kernels import visible_keys, visible_queries

from ._common import kernel

# The G query heads of a kv head sit beside their query in the rows of a tile, (query, group), so one
# bmm per tile serves them all and the kv gradients sum over G inside the bmm.


def _layout(q, k, v, mask, scale):
    """The backward's layouts: q scaled (B, K, S, G, H), k and v (B, K, T, H), the mask as `_layout_mask`."""
    B, S, N, H = q.shape
    K = k.shape[2]
    qs = (q * scale).view(B, S, K, N // K, H).permute(0, 2, 1, 3, 4).contiguous()  # (B, K, S, G, H)
    kh = k.permute(0, 2, 1, 3).contiguous()  # (B, K, T, H)
    vh = v.permute(0, 2, 1, 3).contiguous()  # (B, K, T, H)
    return qs, kh, vh, _layout_mask(mask, K)


def _layout_mask(mask, K):
    """A (B|1, N|1, S|1, T|1) mask as (B|1, K|1, S|1, G|1, T|1), the layout of a tile's rows, or None."""
    if mask is None:
        return None
    b, n, s, t = mask.shape
    mg = mask.reshape(b, K, n // K, s, t) if n != 1 else mask.reshape(b, 1, 1, s, t)
    return mg.permute(0, 1, 3, 2, 4)  # (B|1, K|1, S|1, G|1, T|1)


def _allowed(mg, causal, window, i0, i1, j0, j1, S, T, device):
    """The bool attend-mask of tile (i0:i1, j0:j1) in the (B, K, br, G, bc) layout, or None if all may attend."""
    allowed = None
    off = T - S
    # only tiles crossing the diagonal, or the window's lower edge, need the causal mask
    if causal and (j1 - 1 > i0 + off or (window is not None and j0 <= i1 - 1 + off - window)):
        diagonal = torch.arange(i0, i1, device=device)[:, None, None] + off
        j = torch.arange(j0, j1, device=device)
        allowed = j <= diagonal if window is None else (j <= diagonal) & (j > diagonal - window)  # (br, 1, bc)
    if mg is not None:
        m = mg[:, :, i0:i1] if mg.shape[2] > 1 else mg
        m = m[..., j0:j1] if m.shape[-1] > 1 else m
        allowed = m if allowed is None else (m & allowed)
    return allowed


def _tiles(lo, hi, bs):
    """The starts of the tiles of ``bs`` rows that meet [lo, hi)."""
    return range(lo // bs * bs, hi, bs)


def _exp_masked(s, allowed, shape):
    """exp_ of a tile whose hidden entries are −inf. ATen's CPU exp takes a slow path for −inf (about 4× on
    half-hidden tiles, which every window tile is), so hidden entries are clamped to −80 and zeroed after;
    a visible entry below −80 (weight < 2e-35 against the row's maximum, 1) changes nothing measurable."""
    if allowed is None:
        return s.exp_()
    s.clamp_min_(-80.0).exp_().view(shape).masked_fill_(~allowed, 0.0)
    return s


class _TileMasks:
    """A forward's tile masks, broadcast to the (B, K, br, G, bc) layout: the bool ``allowed`` and the float
    ``bias``, 0 where a query may attend and −∞ where not. Adding the bias and multiplying by ``allowed`` are
    one vectorised pass each; ``masked_fill_`` with a broadcast bool mask is about 8× slower on CPU, and every
    tile a window visits is masked. Without a user mask a tile's pattern depends only on its offset from the
    diagonal and its size, so each is made once per call."""

    def __init__(self, mg, causal, window, S, T, dtype, device):
        self.args, self.dtype, self.device = (mg, causal, window), dtype, device
        self.S, self.T = S, T
        self.memo: dict[tuple[int, int, int], Any] | None = None if mg is not None else {}

    def __call__(self, i0, i1, j0, j1):
        """(allowed, bias) of tile (i0:i1, j0:j1), or None if every query of it may attend every key."""
        key = (j0 - i0, i1 - i0, j1 - j0)
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        mg, causal, window = self.args
        allowed = _allowed(mg, causal, window, i0, i1, j0, j1, self.S, self.T, self.device)
        masks = None
        if allowed is not None:
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, -math.inf)
            masks = allowed, bias
        if self.memo is not None:
            self.memo[key] = masks
        return masks


def _cap(s, softcap):
    """s ← softcap · tanh(s / softcap) in place; returns the derivative 1 − tanh² (None without a cap)."""
    if softcap is None:
        return None
    t = s.div_(softcap).tanh_()
    dcap = 1.0 - t * t
    t.mul_(softcap)
    return dcap


def _scores(qi, kf, j0, j1, softcap):
    """A tile's scores Q_i K_jᵀ (q carries the scale), capped with ``softcap``: (B·K, br·G, bc)."""
    s = torch.bmm(qi, kf[:, j0:j1].transpose(1, 2))
    return s if softcap is None else s.div_(softcap).tanh_().mul_(softcap)


def _forward(q, k, v, mg, causal, scale, bs, softcap=None, window=None):
    """(out (B, S, N, H), lse (B, K, S, G)) in the compute dtype; lse is −∞ where a query sees no key."""
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    G = N // K
    out = q.new_empty((B, S, K, G, H))
    lse = torch.full((B, K, S, G), -math.inf, dtype=q.dtype, device=q.device)
    kf, vf = (x.transpose(1, 2).reshape(B * K, T, H) for x in (k, v))  # (B·K, T, H): a view when B = 1
    tile_masks = _TileMasks(mg, causal, window, S, T, q.dtype, q.device)
    qg = q.view(B, S, K, G, H)
    for i0 in range(0, S, bs):
        i1 = min(S, i0 + bs)
        br = i1 - i0
        qi = q.new_empty((B, K, br, G, H)).copy_(qg[:, i0:i1].permute(0, 2, 1, 3, 4))  # this tile's rows, laid out
        qi = qi.view(B * K, br * G, H).mul_(scale)
        m = torch.full((B * K, br * G), -math.inf, dtype=q.dtype, device=q.device)  # running row max
        ell = torch.zeros_like(m)  # running row sum
        acc = torch.zeros_like(qi)  # (B·K, br·G, H)
        for j0 in _tiles(*visible_keys(i0, i1, S, T, causal, window), bs):  # tiles no query sees are skipped
            j1 = min(T, j0 + bs)
            tile = (B, K, br, G, j1 - j0)
            s = _scores(qi, kf, j0, j1, softcap)  # (B·K, br·G, bc)
            masks = tile_masks(i0, i1, j0, j1)
            if masks is not None:
                s.view(tile).add_(masks[1])
            row_max = s.amax(-1)
            if masks is not None and row_max.isnan().any():  # a non-finite score met the bias: −∞ + ∞ = NaN
                s = _scores(qi, kf, j0, j1, softcap)
                s.view(tile).masked_fill_(~masks[0], -math.inf)  # a hidden entry is −∞ whatever it held
                row_max = s.amax(-1)
            m_new = torch.maximum(m, row_max)
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # a row that has seen no key keeps weight 0
            s.sub_(m_safe[..., None])
            if masks is None:
                s.exp_()  # P_ij
            else:  # clamped first: ATen's CPU exp of −∞ takes a slow path (see `_exp_masked`)
                s.clamp_min_(-80.0).exp_().view(tile).mul_(masks[0])
            alpha = (m - m_safe).exp_()  # rescales what was summed under the old max
            ell.mul_(alpha).add_(s.sum(-1))
            acc.mul_(alpha[..., None]).baddbmm_(s, vf[:, j0:j1])
            m = m_new
        seen = ell > 0
        acc.div_(torch.where(seen, ell, 1.0)[..., None])  # rows that saw nothing stay 0
        out[:, i0:i1] = acc.view(B, K, br, G, H).transpose(1, 2)
        lse[:, :, i0:i1] = torch.where(seen, m + ell.log(), -math.inf).view(B, K, br, G)
    return out.view(B, S, N, H), lse


def _backward(qs, kh, vh, mg, causal, bs, out, lse, dyg, needs=(True, True, True), softcap=None, window=None):
    """(dq (B, K, S, G, H) without the scale, dk, dv (B, K, T, H)), recomputing each tile."""
    B, K, S, G, H = qs.shape
    T = kh.shape[2]
    delta = (dyg * out).sum(-1)  # D = rowsum(dy ⊙ O), (B, K, S, G)
    lse = lse.masked_fill(lse == -math.inf, math.inf)  # exp(s − ∞) = 0: a query that saw nothing passes nothing
    dq = torch.zeros_like(qs)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    kf, vf = kh.view(B * K, T, H), vh.view(B * K, T, H)
    for j0 in range(0, T, bs):
        j1 = min(T, j0 + bs)
        kj, vj = kf[:, j0:j1], vf[:, j0:j1]  # (B·K, bc, H)
        dkj, dvj = dk.view(B * K, T, H)[:, j0:j1], dv.view(B * K, T, H)[:, j0:j1]
        for i0 in _tiles(*visible_queries(j0, j1, S, T, causal, window), bs):  # only queries that see these keys
            i1 = min(S, i0 + bs)
            br = i1 - i0
            qi = qs[:, :, i0:i1].reshape(B * K, br * G, H)
            dyi = dyg[:, :, i0:i1].reshape(B * K, br * G, H)
            p = torch.bmm(qi, kj.transpose(1, 2))  # (B·K, br·G, bc)
            dcap = _cap(p, softcap)
            allowed = _allowed(mg, causal, window, i0, i1, j0, j1, S, T, qs.device)
            if allowed is not None:
                p.view(B, K, br, G, j1 - j0).masked_fill_(~allowed, -math.inf)
            _exp_masked(p.sub_(lse[:, :, i0:i1].reshape(B * K, br * G, 1)), allowed, (B, K, br, G, j1 - j0))  # P_ij
            if needs[2]:
                dvj.baddbmm_(p.transpose(1, 2), dyi)
            ds = torch.bmm(dyi, vj.transpose(1, 2))  # dP_ij
            ds.sub_(delta[:, :, i0:i1].reshape(B * K, br * G, 1)).mul_(p)  # dS = P ⊙ (dP − D)
            if dcap is not None:
                ds.mul_(dcap)  # through the cap to the raw scores
            if needs[0]:
                dq[:, :, i0:i1] += torch.bmm(ds, kj).view(B, K, br, G, H)
            if needs[1]:
                dkj.baddbmm_(ds.transpose(1, 2), qi)  # qi carries the scale
    return dq, dk, dv


def _to_public(dq, dk, dv, scale):
    B, K, S, G, H = dq.shape
    return dq.mul_(scale).permute(0, 2, 1, 3, 4).reshape(B, S, K * G, H), dk.transpose(1, 2), dv.transpose(1, 2)


def _grouped(dy, K):
    B, S, N, H = dy.shape
    return dy.reshape(B, S, K, N // K, H).permute(0, 2, 1, 3, 4).contiguous()  # (B, K, S, G, H)


def _gradients(q, k, v, mask, causal, scale, bs, out, lse, dy, needs, softcap, window):
    """(dq, dk, dv) in the public layouts, from the forward's output (B, S, N, H) and log-sum-exp."""
    qs, kh, vh, mg = _layout(q, k, v, mask, scale)
    K = k.shape[2]
    dyg, og = _grouped(dy, K), _grouped(out, K)  # (B, K, S, G, H)
    dq, dk, dv = _backward(qs, kh, vh, mg, causal, bs, og, lse, dyg, needs, softcap, window)
    return _to_public(dq, dk, dv, scale)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale, block_size, softcap=None, window=None):
        out, lse = _forward(q, k, v, _layout_mask(mask, k.shape[2]), causal, scale, block_size, softcap, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.causal, ctx.scale, ctx.block_size = mask, causal, scale, block_size
        ctx.softcap, ctx.window = softcap, window
        return out

    @staticmethod
    def backward(ctx, dy):
        q, k, v, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        args = ctx.mask, ctx.causal, ctx.scale, ctx.block_size, out, lse, dy, needs, ctx.softcap, ctx.window
        grads = _gradients(q, k, v, *args)
        return *(g if n else None for g, n in zip(grads, needs)), None, None, None, None, None, None


def flash_attention_backward(q, k, v, dy, causal, mask, scale, block_size, softcap=None, window=None):
    out, lse = _forward(q, k, v, _layout_mask(mask, k.shape[2]), causal, scale, block_size, softcap, window)
    return _gradients(q, k, v, mask, causal, scale, block_size, out, lse, dy, (True,) * 3, softcap, window)


flash_attention = kernel(FlashAttention)
