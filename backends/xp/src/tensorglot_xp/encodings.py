"""Array API encoding kernels: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned)."""

from __future__ import annotations

from array_api_compat import array_namespace, device


def rope(x, positions, inv_freq, mscale, sign, style, r):
    xp = array_namespace(x)
    B, S, N, H = x.shape
    at = device(x)
    positions = xp.arange(S, device=at) if positions is None else positions
    positions = positions if positions.ndim == 2 else positions[None, :]  # (B|1, S)
    freq = xp.asarray(inv_freq, dtype=xp.float32, device=at)  # (r/2,), a NumPy table from the spec
    angle = xp.astype(xp.astype(positions, xp.float32)[..., None] * freq, x.dtype)  # float32 products, as pinned
    cos = (xp.cos(angle) * mscale)[:, :, None, :]  # (B|1, S, 1, r/2)
    sin = (xp.sin(angle) * (mscale * sign))[:, :, None, :]
    # interleaved pairs (2i, 2i + 1), neox pairs (i, i + r/2); each pair turns by +angle (or −angle).
    a, b = (x[..., 0:r:2], x[..., 1:r:2]) if style == "interleaved" else (x[..., : r // 2], x[..., r // 2 : r])
    a, b = a * cos - b * sin, a * sin + b * cos
    if style == "interleaved":
        rotated = xp.reshape(xp.stack((a, b), axis=-1), (B, S, N, r))  # (..., r/2, 2) → (..., r), re-interleaved
    else:
        rotated = xp.concat((a, b), axis=-1)
    return rotated if r == H else xp.concat((rotated, x[..., r:]), axis=-1)
