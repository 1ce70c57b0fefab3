"""NumPy blockwise (flash) attention: see the spec, `tensorglot.ops.flash_attention`.

The hot loops write into preallocated tile buffers with ``out=`` and in-place ufuncs, so a tile step
allocates nothing of size block_size² beyond the buffer it reuses.
"""

from __future__ import annotations

import math

import numpy as np

from tensorglot.kernels import visible_keys, visible_queries


def _inputs(q, k, v, mask, scale):
    """Grouped, contiguous tiles: qg (B, K, G, S, H) carrying the scale (so dk = dSᵀ q needs no multiply),
    kh, vh (B, K, 1, T, H) and the mask as (B|1, K|1, G|1, S|1, T|1)."""
    B, S, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = np.ascontiguousarray((q * scale).reshape(B, S, K, G, H).transpose(0, 2, 3, 1, 4))  # (B, K, G, S, H)
    kh = np.ascontiguousarray(k.transpose(0, 2, 1, 3))[:, :, None]  # (B, K, 1, T, H)
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))[:, :, None]  # (B, K, 1, T, H)
    mg = None
    if mask is not None:
        b, n, s, t = mask.shape
        mg = mask.reshape(b, K, G, s, t) if n != 1 else mask.reshape(b, 1, 1, s, t)
    return qg, kh, vh, mg


def _allowed(mg, causal, window, i0, i1, j0, j1, S, T):
    """The bool attend-mask of tile (i0:i1, j0:j1), or None when the tile sees every key."""
    allowed = None
    off = T - S
    # only tiles crossing the diagonal, or the window's lower edge, need the causal mask
    if causal and (j1 - 1 > i0 + off or (window is not None and j0 <= i1 - 1 + off - window)):
        diagonal, j = np.arange(i0, i1)[:, None] + off, np.arange(j0, j1)[None, :]  # (br, 1), (1, bc)
        allowed = j <= diagonal if window is None else (j <= diagonal) & (j > diagonal - window)
    if mg is not None:
        m = mg[..., i0:i1, :] if mg.shape[-2] > 1 else mg
        m = m[..., j0:j1] if m.shape[-1] > 1 else m
        allowed = m if allowed is None else (m & allowed)
    return allowed


def _tiles(lo, hi, bs):
    """The starts of the tiles of ``bs`` rows that meet [lo, hi)."""
    return range(lo // bs * bs, hi, bs)


def _buffer(flat, shape):
    """A contiguous view of the first prod(shape) elements of ``flat``: one allocation serves every tile shape."""
    return flat[: math.prod(shape)].reshape(shape)


def _forward(qg, kh, vh, mg, causal, bs, S, T, softcap=None, window=None):
    """(out (B, K, G, S, H), lse (B, K, G, S)) in the compute dtype; lse is −∞ for a query that sees no key."""
    B, K, G, _, H = qg.shape
    cd = qg.dtype
    out = np.zeros_like(qg)
    lse = np.full((B, K, G, S), -np.inf, dtype=cd)
    s_flat = np.empty(B * K * G * bs * bs, dtype=cd)
    pv_flat = np.empty(B * K * G * bs * H, dtype=cd)
    for i0 in range(0, S, bs):
        i1 = min(S, i0 + bs)
        qi = qg[:, :, :, i0:i1]  # (B, K, G, br, H)
        m = np.full((B, K, G, i1 - i0), -np.inf, dtype=cd)  # running row max
        ell = np.zeros_like(m)  # running row sum
        acc = out[:, :, :, i0:i1]  # accumulates in place in the output
        for j0 in _tiles(*visible_keys(i0, i1, S, T, causal, window), bs):  # tiles no query sees are skipped
            j1 = min(T, j0 + bs)
            s = np.matmul(qi, kh[:, :, :, j0:j1].swapaxes(-1, -2), out=_buffer(s_flat, (B, K, G, i1 - i0, j1 - j0)))
            if softcap is not None:
                np.tanh(np.divide(s, softcap, out=s), out=s)
                s *= softcap
            allowed = _allowed(mg, causal, window, i0, i1, j0, j1, S, T)
            if allowed is not None:
                np.copyto(s, -np.inf, where=~allowed)
            m_new = np.maximum(m, s.max(axis=-1))
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)  # a row that has seen no key yet keeps weight 0
            np.subtract(s, m_safe[..., None], out=s)
            np.exp(s, out=s)  # P_ij
            alpha = np.exp(m - m_safe)  # rescales what was summed under the old max
            ell *= alpha
            ell += s.sum(axis=-1)
            acc *= alpha[..., None]
            acc += np.matmul(s, vh[:, :, :, j0:j1], out=_buffer(pv_flat, (B, K, G, i1 - i0, H)))
            m = m_new
        seen = ell > 0
        np.divide(acc, ell[..., None], out=acc, where=seen[..., None])  # rows that saw nothing stay 0
        with np.errstate(divide="ignore"):
            lse[:, :, :, i0:i1] = np.where(seen, m + np.log(ell), -np.inf)
    return out, lse


def _backward(qg, kh, vh, mg, causal, bs, S, T, out, lse, dyg, softcap=None, window=None):
    """(dq (B, K, G, S, H) without the scale, dk (B, K, T, H), dv (B, K, T, H)), recomputing each tile."""
    B, K, G, _, H = qg.shape
    cd = qg.dtype
    delta = np.einsum("bkgsh,bkgsh->bkgs", dyg, out)  # D = rowsum(dy ⊙ O)
    lse = np.where(np.isneginf(lse), np.inf, lse)  # exp(s − ∞) = 0: a query that saw nothing passes nothing
    dq = np.zeros_like(qg)
    dk = np.zeros((B, K, T, H), dtype=cd)
    dv = np.zeros((B, K, T, H), dtype=cd)
    p_flat = np.empty(B * K * G * bs * bs, dtype=cd)
    ds_flat = np.empty_like(p_flat)
    for j0 in range(0, T, bs):
        j1 = min(T, j0 + bs)
        kj, vj = kh[:, :, :, j0:j1], vh[:, :, :, j0:j1]  # (B, K, 1, bc, H)
        for i0 in _tiles(*visible_queries(j0, j1, S, T, causal, window), bs):  # only queries that see these keys
            i1 = min(S, i0 + bs)
            shape = (B, K, G, i1 - i0, j1 - j0)
            qi, dyi = qg[:, :, :, i0:i1], dyg[:, :, :, i0:i1]  # (B, K, G, br, H)
            p = np.matmul(qi, kj.swapaxes(-1, -2), out=_buffer(p_flat, shape))
            dcap = None
            if softcap is not None:
                np.tanh(np.divide(p, softcap, out=p), out=p)
                dcap = 1.0 - p * p  # the cap's derivative
                p *= softcap
            allowed = _allowed(mg, causal, window, i0, i1, j0, j1, S, T)
            if allowed is not None:
                np.copyto(p, -np.inf, where=~allowed)
            np.subtract(p, lse[:, :, :, i0:i1, None], out=p)
            np.exp(p, out=p)  # P_ij, recomputed from L
            dv[:, :, j0:j1] += np.matmul(p.swapaxes(-1, -2), dyi).sum(axis=2)  # the G heads of a kv head add up
            ds = np.matmul(dyi, vj.swapaxes(-1, -2), out=_buffer(ds_flat, shape))  # dP_ij
            np.subtract(ds, delta[:, :, :, i0:i1, None], out=ds)
            np.multiply(ds, p, out=ds)  # dS_ij = P ⊙ (dP − D)
            if dcap is not None:
                ds *= dcap  # through the cap to the raw scores
            dq[:, :, :, i0:i1] += np.matmul(ds, kj)
            dk[:, :, j0:j1] += np.matmul(ds.swapaxes(-1, -2), qi).sum(axis=2)  # qi carries the scale
    return dq, dk, dv


def flash_attention(q, k, v, causal, mask, scale, block_size, softcap=None, window=None):
    B, S, N, H = q.shape
    qg, kh, vh, mg = _inputs(q, k, v, mask, scale)
    out, _ = _forward(qg, kh, vh, mg, causal, block_size, S, k.shape[1], softcap, window)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)  # (B, S, N, H)


def flash_attention_backward(q, k, v, dy, causal, mask, scale, block_size, softcap=None, window=None):
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    qg, kh, vh, mg = _inputs(q, k, v, mask, scale)
    dyg = np.ascontiguousarray(dy.reshape(B, S, K, N // K, H).transpose(0, 2, 3, 1, 4))  # (B, K, G, S, H)
    out, lse = _forward(qg, kh, vh, mg, causal, block_size, S, T, softcap, window)
    dq, dk, dv = _backward(qg, kh, vh, mg, causal, block_size, S, T, out, lse, dyg, softcap, window)
    dq *= scale
    return dq.transpose(0, 3, 1, 2, 4).reshape(B, S, N, H), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
