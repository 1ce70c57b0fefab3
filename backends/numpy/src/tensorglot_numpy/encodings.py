"""NumPy encodings: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned there)."""

from __future__ import annotations

import numpy as np

from tensorglot import checks
from tensorglot.encodings import frequency_table, yarn_attention_factor

from ._common import as_float, as_int, compute_dtype

_FLOAT = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


def _dtype(fn, dtype):
    if dtype not in _FLOAT:
        raise TypeError(f"{fn}: dtype must be one of {', '.join(_FLOAT)} on the numpy backend, got {dtype!r}")
    return _FLOAT[dtype]


def sinusoidal(seq_len, dim, /, *, base=10000.0, dtype="float32"):
    fn = "sinusoidal"
    seq_len = checks.check_positive_int(fn, "seq_len", seq_len, allow_zero=True)
    dim = checks.check_positive_int(fn, "dim", dim)
    if dim % 2:
        raise ValueError(f"{fn}: dim must be even (sin and cos interleave), got {dim}")
    base = checks.check_positive_float(fn, "base", base)
    out_dtype = _dtype(fn, dtype)
    pos = np.arange(seq_len, dtype=np.float64)[:, None]  # (S, 1)
    angle = pos / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # (S, D/2)
    pe = np.empty((seq_len, dim), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe.astype(out_dtype)


def rope_frequencies(dim, /, *, theta=10000.0, scaling=None, dtype="float32"):
    return frequency_table(dim, theta=theta, scaling=scaling).astype(_dtype("rope_frequencies", dtype))


def _rotate(fn, x, positions, theta, style, rotary_dim, scaling, sign):
    x = as_float(fn, "dy" if sign < 0 else "x", x)
    pos_shape = None if positions is None else np.shape(positions)
    r = checks.rope(fn, x.shape, pos_shape, style, rotary_dim)
    S = x.shape[1]
    if positions is None:
        positions = np.arange(S)
    positions = as_int(fn, "positions", positions)
    if positions.ndim == 1:
        positions = positions[None, :]  # (1, S)
    cd = compute_dtype(x.dtype)
    inv_freq = frequency_table(r, theta=theta, scaling=scaling).astype(np.float32)  # (r/2,)
    angle = positions.astype(np.float32)[..., None] * inv_freq  # (B|1, S, r/2), float32 as pinned
    mscale = yarn_attention_factor(scaling)
    cos = (np.cos(angle.astype(cd)) * mscale)[:, :, None, :]  # (B|1, S, 1, r/2)
    sin = (np.sin(angle.astype(cd)) * mscale * sign)[:, :, None, :]
    xc = x.astype(cd, copy=False)
    out = xc.copy()
    if style == "interleaved":
        a, b = xc[..., 0:r:2], xc[..., 1:r:2]  # pairs (2i, 2i + 1)
        out[..., 0:r:2] = a * cos - b * sin
        out[..., 1:r:2] = a * sin + b * cos
    else:
        h = r // 2
        a, b = xc[..., :h], xc[..., h:r]  # pairs (i, i + r/2)
        out[..., :h] = a * cos - b * sin
        out[..., h:r] = a * sin + b * cos
    return out.astype(x.dtype, copy=False)


def rope(x, /, *, positions=None, theta=10000.0, style="interleaved", rotary_dim=None, scaling=None):
    return _rotate("rope", x, positions, theta, style, rotary_dim, scaling, +1.0)


def rope_backward(dy, /, *, positions=None, theta=10000.0, style="interleaved", rotary_dim=None, scaling=None):
    # RoPE is a rotation R (times YaRN's factor m): the VJP is m·Rᵀ = m·R(−angle).
    return _rotate("rope_backward", dy, positions, theta, style, rotary_dim, scaling, -1.0)
