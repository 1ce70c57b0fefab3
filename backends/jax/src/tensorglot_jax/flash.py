"""JAX blockwise (flash) attention: see the spec, `tensorglot.ops.flash_attention`.

A `jax.custom_vjp` whose forward scans the query tiles (`lax.map`) with a `lax.fori_loop` over the key
tiles, keeping the output and the log-sum-exp; the backward scans the key tiles and recomputes each
tile's probabilities. S and T are padded up to whole tiles; padded keys are masked, padded queries dropped.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from tensorglot.kernels import softcapped, visible_keys, visible_queries

from ._common import vjp_kernel


def _prep(q, k, v, mask, scale, bs):
    """The padded tile layout: q (B, K, G, Sp, H) carrying the scale, k and v (B, K, Tp, H), the mask
    (B|1, K|1, G|1, Sp|1, Tp|1) or None."""
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    G = N // K
    Sp, Tp = (max(1, -(-n // bs)) * bs for n in (S, T))  # whole tiles, at least one
    qg = (q * scale).reshape(B, S, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, S, H)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, Sp - S), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))  # (B, K, Tp, H)
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    mg = None
    if mask is not None:
        b, n, s, t = mask.shape
        mg = mask.reshape(b, K, G, s, t) if n != 1 else mask.reshape(b, 1, 1, s, t)
        mg = jnp.pad(mg, ((0, 0), (0, 0), (0, 0), (0, Sp - S if s > 1 else 0), (0, Tp - T if t > 1 else 0)))
    return qg, kh, vh, mg


def _tile_ranges(visible, n, length, other, bs, causal, window):
    """Per tile of ``bs`` rows out of ``n`` tiles over ``length`` rows, the first and one past the last tile
    of the other axis it visits (``visible`` is `visible_keys` or `visible_queries`): static tables, so the
    loops skip the tiles the causal mask or the window hides."""
    ranges = [visible(r * bs, min(length, r * bs + bs), *other, causal, window) for r in range(n)]
    return jnp.array([lo // bs for lo, _ in ranges]), jnp.array([-(-hi // bs) for _, hi in ranges])


def _allowed(mg, causal, window, i0, j0, bs, S, T):
    """The bool attend-mask of the tile at (i0, j0), broadcastable to (B, K, G, bs, bs)."""
    i = i0 + jnp.arange(bs)[:, None] + (T - S)  # the diagonal: bottom-right
    j = j0 + jnp.arange(bs)[None, :]
    allowed = j < T  # padded keys
    if causal:
        allowed = allowed & (j <= i) if window is None else allowed & (j <= i) & (j > i - window)
    if mg is not None:
        m = lax.dynamic_slice_in_dim(mg, i0, bs, axis=3) if mg.shape[3] > 1 else mg
        m = lax.dynamic_slice_in_dim(m, j0, bs, axis=4) if m.shape[4] > 1 else m
        allowed = allowed & m
    return allowed


def _forward(qg, kh, vh, mg, causal, bs, S, T, softcap, window):
    """(out (B, K, G, Sp, H), lse (B, K, G, Sp)) in the compute dtype; lse is −∞ where a query sees no key."""
    B, K, G, Sp, H = qg.shape
    nq = Sp // bs
    first, end = _tile_ranges(visible_keys, nq, S, (S, T), bs, causal, window)

    def query_tile(iq):
        i0 = iq * bs
        qi = lax.dynamic_slice_in_dim(qg, i0, bs, axis=3)  # (B, K, G, bs, H)

        def key_tile(jk, carry):
            m, ell, acc = carry
            j0 = jk * bs
            kj = lax.dynamic_slice_in_dim(kh, j0, bs, axis=2)  # (B, K, bs, H)
            vj = lax.dynamic_slice_in_dim(vh, j0, bs, axis=2)
            s = softcapped(jnp.einsum("bkgqh,bkth->bkgqt", qi, kj), softcap)[0]
            s = jnp.where(_allowed(mg, causal, window, i0, j0, bs, S, T), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen no key keeps weight 0
            p = jnp.exp(s - m_safe[..., None])  # P_ij
            alpha = jnp.exp(m - m_safe)  # rescales what was summed under the old max
            acc = alpha[..., None] * acc + jnp.einsum("bkgqt,bkth->bkgqh", p, vj)
            return m_new, alpha * ell + p.sum(-1), acc

        m0 = jnp.full((B, K, G, bs), -jnp.inf, dtype=qg.dtype)
        # Key tiles past the causal diagonal or before the window of every query of the tile are never visited.
        m, ell, acc = lax.fori_loop(first[iq], end[iq], key_tile, (m0, jnp.zeros_like(m0), jnp.zeros_like(qi)))
        seen = ell > 0
        ell1 = jnp.where(seen, ell, 1.0)
        return jnp.where(seen[..., None], acc / ell1[..., None], 0.0), jnp.where(seen, m + jnp.log(ell1), -jnp.inf)

    out, lse = lax.map(query_tile, jnp.arange(nq))  # (nq, B, K, G, bs, H), (nq, B, K, G, bs)
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, Sp, H)
    return out, jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Sp)


def _backward(qg, kh, vh, mg, causal, bs, S, T, out, lse, dyg, softcap, window):
    """(dq (B, K, G, Sp, H) without the scale, dk, dv (B, K, Tp, H)), recomputing each tile."""
    B, K, _, _, H = qg.shape
    nk = kh.shape[2] // bs
    first, end = _tile_ranges(visible_queries, nk, T, (S, T), bs, causal, window)
    delta = jnp.sum(dyg * out, axis=-1)  # D = rowsum(dy ⊙ O), (B, K, G, Sp)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # exp(s − ∞) = 0: a query that saw nothing passes nothing

    def key_tile(dq, jk):
        j0 = jk * bs
        kj = lax.dynamic_slice_in_dim(kh, j0, bs, axis=2)  # (B, K, bs, H)
        vj = lax.dynamic_slice_in_dim(vh, j0, bs, axis=2)

        def query_tile(iq, carry):
            dq, dkj, dvj = carry
            i0 = iq * bs
            qi, dyi = (lax.dynamic_slice_in_dim(a, i0, bs, axis=3) for a in (qg, dyg))  # (B, K, G, bs, H)
            lse_i, delta_i = (lax.dynamic_slice_in_dim(a, i0, bs, axis=3) for a in (lse, delta))  # (B, K, G, bs)
            s, dcap = softcapped(jnp.einsum("bkgqh,bkth->bkgqt", qi, kj), softcap)
            s = jnp.where(_allowed(mg, causal, window, i0, j0, bs, S, T), s, -jnp.inf)
            p = jnp.exp(s - lse_i[..., None])  # P_ij, recomputed from L
            dvj = dvj + jnp.einsum("bkgqt,bkgqh->bkth", p, dyi)  # the G heads of a kv head add up
            ds = p * (jnp.einsum("bkgqh,bkth->bkgqt", dyi, vj) - delta_i[..., None])  # P ⊙ (dP − D)
            ds = ds if dcap is None else ds * dcap  # through the cap to the raw scores
            dqi = lax.dynamic_slice_in_dim(dq, i0, bs, axis=3) + jnp.einsum("bkgqt,bkth->bkgqh", ds, kj)
            dkj = dkj + jnp.einsum("bkgqt,bkgqh->bkth", ds, qi)  # qi carries the scale
            return lax.dynamic_update_slice_in_dim(dq, dqi, i0, axis=3), dkj, dvj

        zero = jnp.zeros_like(kj)  # only the query tiles that see some key of this tile are visited
        dq, dkj, dvj = lax.fori_loop(first[jk], end[jk], query_tile, (dq, zero, zero))
        return dq, (dkj, dvj)

    dq, (dk, dv) = lax.scan(key_tile, jnp.zeros_like(qg), jnp.arange(nk))  # dk, dv (nk, B, K, bs, H)
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, nk * bs, H)
    return dq, dk, jnp.moveaxis(dv, 0, 2).reshape(B, K, nk * bs, H)


def _grads(q, k, v, mask, causal, scale, bs, softcap, window, out, lse, dy):
    B, S, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    qg, kh, vh, mg = _prep(q, k, v, mask, scale, bs)
    dyg = dy.reshape(B, S, K, N // K, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, S, H)
    dyg = jnp.pad(dyg, ((0, 0), (0, 0), (0, 0), (0, qg.shape[3] - S), (0, 0)))
    dq, dk, dv = _backward(qg, kh, vh, mg, causal, bs, S, T, out, lse, dyg, softcap, window)
    dq = (dq[:, :, :, :S] * scale).transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)  # (B, S, N, H)
    dk, dv = (g[:, :, :T].transpose(0, 2, 1, 3) for g in (dk, dv))  # (B, T, K, H)
    return dq, dk, dv


def _flash_fwd(q, k, v, causal, mask, scale, bs, softcap, window):
    B, S, N, H = q.shape
    qg, kh, vh, mg = _prep(q, k, v, mask, scale, bs)
    out, lse = _forward(qg, kh, vh, mg, causal, bs, S, k.shape[1], softcap, window)
    y = out[:, :, :, :S].transpose(0, 3, 1, 2, 4).reshape(B, S, N, H)  # (B, S, N, H)
    return y, (q, k, v, mask, out, lse)


def _flash_bwd(causal, scale, bs, softcap, window, res, dy):
    q, k, v, mask, out, lse = res
    grads = _grads(q, k, v, mask, causal, scale, bs, softcap, window, out, lse, dy)
    return (*grads, None)  # the mask gets no gradient


_flash_attention = vjp_kernel(_flash_fwd, _flash_bwd, (3, 5, 6, 7, 8))


def flash_attention(q, k, v, causal, mask, scale, bs, softcap=None, window=None):
    return _flash_attention(q, k, v, causal, mask, scale, bs, softcap, window)


@partial(jax.jit, static_argnums=(4, 6, 7, 8, 9))
def _flash_attention_backward(q, k, v, dy, causal, mask, scale, bs, softcap, window):
    qg, kh, vh, mg = _prep(q, k, v, mask, scale, bs)
    out, lse = _forward(qg, kh, vh, mg, causal, bs, q.shape[1], k.shape[1], softcap, window)
    return _grads(q, k, v, mask, causal, scale, bs, softcap, window, out, lse, dy)


def flash_attention_backward(q, k, v, dy, causal, mask, scale, bs, softcap=None, window=None):
    return _flash_attention_backward(q, k, v, dy, causal, mask, scale, bs, softcap, window)
