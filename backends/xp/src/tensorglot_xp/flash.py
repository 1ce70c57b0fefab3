"""Array API blockwise (flash) attention: see the spec, `tensorglot.ops.flash_attention` (the algorithm).

Tiles are slices; the output and the gradients are assembled with concat rather than written into a
buffer (in-place updates are optional in the standard). Tiles that causality hides entirely are skipped.
"""

from __future__ import annotations

from tensorglot.kernels import device, namespace, softcapped, visible_keys

from .ops import group_queries, grouped_mask, kv_grouped, kv_heads_first, ungroup_queries, visible


def _tiles(n, bs):
    """Slices of ``bs`` rows covering range(n); one empty slice when n = 0, so every concat has a part."""
    return [slice(i, min(n, i + bs)) for i in range(0, max(n, 1), bs)]


def _skipped(causal, window, rows, cols, S, T):
    """Whether tile (rows, cols) adds nothing: it has no key, or no query of ``rows`` sees a key of ``cols``
    (bottom-right causal, sliding window)."""
    lo, hi = visible_keys(rows.start, rows.stop, S, T, causal, window)
    return cols.start == cols.stop or cols.start >= hi or cols.stop <= lo


def _grouped(q, k, v, mask, scale):
    """qg (B, K, G, S, H) carrying the scale (so dk = dSᵀ q needs no multiply), kh and vh (B, K, 1, T, H),
    and the mask broadcast (a view) to (B, K, G, S, T), so tiles slice it alike."""
    xp, K = namespace(q), k.shape[2]
    qg = group_queries(q * scale, K)
    if mask is not None:
        mask = xp.broadcast_to(grouped_mask(mask, K), (*qg.shape[:4], k.shape[1]))
    return qg, kv_grouped(k), kv_grouped(v), mask


def _scores(qg, kh, mask, causal, rows, cols, softcap, window):
    """S_ij = Q_i K_jᵀ (B, K, G, br, bc) capped, −inf where a query may not attend; and the cap's derivative."""
    xp = namespace(qg)
    S, T = qg.shape[3], kh.shape[3]
    s, dcap = softcapped(xp.matmul(qg[:, :, :, rows, :], xp.matrix_transpose(kh[:, :, :, cols, :])), softcap)
    ids = xp.arange(max(S, T), device=device(qg))
    tile_mask = None if mask is None else mask[:, :, :, rows, cols]
    allowed = visible(causal, tile_mask, ids[rows], ids[cols], T - S, window)
    return (s if allowed is None else xp.where(allowed, s, -xp.inf)), dcap


def _forward(qg, kh, vh, mask, causal, bs, softcap=None, window=None):
    """out (B, K, G, S, H) and the log-sum-exp L (B, K, G, S), −inf for a query that sees no key."""
    xp = namespace(qg)
    S, T = qg.shape[3], kh.shape[3]
    outs, lses = [], []
    for rows in _tiles(qg.shape[3], bs):
        acc = xp.zeros_like(qg[:, :, :, rows, :])  # (B, K, G, br, H)
        top = xp.full(acc.shape[:4], -xp.inf, dtype=qg.dtype, device=device(qg))  # the running row max m
        total = xp.zeros_like(top)  # the running row sum ℓ
        for cols in _tiles(kh.shape[3], bs):
            if _skipped(causal, window, rows, cols, S, T):
                continue
            s, _ = _scores(qg, kh, mask, causal, rows, cols, softcap, window)
            new_top = xp.maximum(top, xp.max(s, axis=-1))
            shift = xp.where(new_top == -xp.inf, 0.0, new_top)  # a row that has seen no key keeps weight 0
            p = xp.exp(s - shift[..., None])  # P_ij
            rescale = xp.exp(top - shift)  # what was summed under the old maximum
            total = rescale * total + xp.sum(p, axis=-1)
            acc = rescale[..., None] * acc + xp.matmul(p, vh[:, :, :, cols, :])
            top = new_top
        seen = total > 0.0
        safe = xp.where(seen, total, 1.0)
        outs.append(acc / safe[..., None])  # a row that saw nothing has acc = 0 and stays 0
        lses.append(xp.where(seen, top + xp.log(safe), -xp.inf))
    return xp.concat(outs, axis=3), xp.concat(lses, axis=3)


def _backward(qg, kh, vh, mask, causal, bs, out, lse, dyg, softcap=None, window=None):
    """(dq (B, K, G, S, H) without the scale, dk (B, K, T, H), dv (B, K, T, H)), recomputing each tile."""
    xp = namespace(qg)
    S, T = qg.shape[3], kh.shape[3]
    delta = xp.sum(dyg * out, axis=-1)  # D = rowsum(dy ⊙ O), (B, K, G, S)
    lse = xp.where(lse == -xp.inf, xp.inf, lse)  # exp(s − ∞) = 0: a query that saw nothing passes nothing
    row_tiles = _tiles(qg.shape[3], bs)
    dq = [xp.zeros_like(qg[:, :, :, rows, :]) for rows in row_tiles]
    grads = []  # (dk, dv) of each key tile
    for cols in _tiles(kh.shape[3], bs):
        kj, vj = kh[:, :, :, cols, :], vh[:, :, :, cols, :]  # (B, K, 1, bc, H)
        dk = dv = xp.zeros_like(kj[:, :, 0, ...])  # (B, K, bc, H)
        for n, rows in enumerate(row_tiles):
            if _skipped(causal, window, rows, cols, S, T):
                continue
            qi, dyi = qg[:, :, :, rows, :], dyg[:, :, :, rows, :]
            s, dcap = _scores(qg, kh, mask, causal, rows, cols, softcap, window)
            p = xp.exp(s - lse[:, :, :, rows, None])  # P_ij from L
            ds = p * (xp.matmul(dyi, xp.matrix_transpose(vj)) - delta[:, :, :, rows, None])  # P ⊙ (dP − D)
            ds = ds if dcap is None else ds * dcap  # through the cap to the raw scores
            dq[n] = dq[n] + xp.matmul(ds, kj)
            # The G query heads of a kv head add up; qi carries the scale.
            dk = dk + xp.sum(xp.matmul(xp.matrix_transpose(ds), qi), axis=2)
            dv = dv + xp.sum(xp.matmul(xp.matrix_transpose(p), dyi), axis=2)
        grads.append((dk, dv))
    return xp.concat(dq, axis=3), *(xp.concat(g, axis=2) for g in zip(*grads))


def flash_attention(q, k, v, causal, mask, scale, block_size, softcap=None, window=None):
    qg, kh, vh, mg = _grouped(q, k, v, mask, scale)
    return ungroup_queries(_forward(qg, kh, vh, mg, causal, block_size, softcap, window)[0])  # (B, S, N, H)


def flash_attention_backward(q, k, v, dy, causal, mask, scale, block_size, softcap=None, window=None):
    qg, kh, vh, mg = _grouped(q, k, v, mask, scale)
    out, lse = _forward(qg, kh, vh, mg, causal, block_size, softcap, window)
    dq, dk, dv = _backward(qg, kh, vh, mg, causal, block_size, out, lse, group_queries(dy, k.shape[2]), softcap, window)
    return ungroup_queries(dq * scale), kv_heads_first(dk), kv_heads_first(dv)
