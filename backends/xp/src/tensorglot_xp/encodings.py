"""Array API encoding kernels: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned)."""

from __future__ import annotations

from tensorglot.kernels import device, namespace


def rope(x, positions, inv_freq, mscale, sign, style, r):
    xp, (B, S, N, H), at = namespace(x), x.shape, device(x)
    positions = xp.arange(S, device=at) if positions is None else positions
    positions = positions if positions.ndim == 2 else xp.expand_dims(positions, axis=0)  # (B|1, S)
    freq = xp.asarray(inv_freq, dtype=xp.float32, device=at)  # (r/2,), a NumPy table from the spec
    angle = xp.astype(xp.expand_dims(xp.astype(positions, xp.float32), axis=-1) * freq, x.dtype)  # as pinned
    # (B|1, S, 1, r/2). A decoding step is per-op cost: no product by 1, and no [..., None] (indexing is dear)
    cos, sin = (xp.expand_dims(f(angle) if m == 1.0 else f(angle) * m, axis=2) for f, m in
                ((xp.cos, mscale), (xp.sin, mscale * sign)))  # fmt: skip
    # interleaved pairs (2i, 2i + 1), neox pairs (i, i + r/2); each pair turns by +angle (or −angle).
    a, b = (x[..., 0:r:2], x[..., 1:r:2]) if style == "interleaved" else (x[..., : r // 2], x[..., r // 2 : r])
    a, b = a * cos - b * sin, a * sin + b * cos
    if style == "interleaved":
        rotated = xp.reshape(xp.stack((a, b), axis=-1), (B, S, N, r))  # (..., r/2, 2) → (..., r), re-interleaved
    else:
        rotated = xp.concat((a, b), axis=-1)
    return rotated if r == H else xp.concat((rotated, x[..., r:]), axis=-1)
