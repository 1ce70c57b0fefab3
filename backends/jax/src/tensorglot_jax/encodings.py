"""JAX encoding kernels: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned there)."""

from __future__ import annotations

import jax.numpy as jnp

from ._common import vjp_kernel


def _rope_fwd(x, positions, inv_freq, mscale, sign, style, r):
    positions = jnp.arange(x.shape[1]) if positions is None else positions
    if positions.ndim == 1:
        positions = positions[None, :]  # (1, S)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # (B|1, S, r/2), float32 as pinned
    cos = (jnp.cos(angle.astype(x.dtype)) * mscale)[:, :, None, :]  # (B|1, S, 1, r/2)
    sin = (jnp.sin(angle.astype(x.dtype)) * (mscale * sign))[:, :, None, :]
    if style == "interleaved":
        a, b = x[..., 0:r:2], x[..., 1:r:2]  # pairs (2i, 2i + 1)
        rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(*x.shape[:-1], r)
    else:
        a, b = x[..., : r // 2], x[..., r // 2 : r]  # pairs (i, i + r/2)
        rotated = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    y = jnp.concatenate([rotated, x[..., r:]], axis=-1) if r < x.shape[-1] else rotated
    return y, (positions, inv_freq)


def _rope_bwd(mscale, sign, style, r, res, dy):
    # RoPE is a rotation R (times YaRN's factor m): the VJP is m·Rᵀ = m·R(−angle).
    return rope(dy, *res, mscale, -sign, style, r), None, None


rope = vjp_kernel(_rope_fwd, _rope_bwd, (3, 4, 5, 6))
