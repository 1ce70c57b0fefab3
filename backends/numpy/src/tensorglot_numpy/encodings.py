"""NumPy encoding kernels: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned there)."""

from __future__ import annotations

import numpy as np


def rope(x, positions, inv_freq, mscale, sign, style, r):
    S = x.shape[1]
    positions = np.arange(S) if positions is None else positions
    if positions.ndim == 1:
        positions = positions[None, :]  # (1, S)
    angle = positions.astype(np.float32)[..., None] * inv_freq  # (B|1, S, r/2), float32 as pinned
    cos = (np.cos(angle.astype(x.dtype)) * mscale)[:, :, None, :]  # (B|1, S, 1, r/2)
    sin = (np.sin(angle.astype(x.dtype)) * (mscale * sign))[:, :, None, :]
    out = x.copy()
    if style == "interleaved":
        a, b = x[..., 0:r:2], x[..., 1:r:2]  # pairs (2i, 2i + 1)
        out[..., 0:r:2] = a * cos - b * sin
        out[..., 1:r:2] = a * sin + b * cos
    else:
        h = r // 2
        a, b = x[..., :h], x[..., h:r]  # pairs (i, i + r/2)
        out[..., :h] = a * cos - b * sin
        out[..., h:r] = a * sin + b * cos
    return out
