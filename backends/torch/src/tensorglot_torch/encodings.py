"""PyTorch encodings: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned there)."""

from __future__ import annotations

import torch

from tensorglot import checks
from tensorglot.encodings import frequency_table, yarn_attention_factor

from ._common import DTYPES, as_float, as_int, compute_dtype


def _dtype(fn, dtype):
    if dtype not in ("float64", "float32", "float16", "bfloat16"):
        raise TypeError(f"{fn}: dtype must be one of float64, float32, float16, bfloat16, got {dtype!r}")
    return DTYPES[dtype]


def sinusoidal(seq_len, dim, /, *, base=10000.0, dtype="float32"):
    fn = "sinusoidal"
    seq_len = checks.check_positive_int(fn, "seq_len", seq_len, allow_zero=True)
    dim = checks.check_positive_int(fn, "dim", dim)
    if dim % 2:
        raise ValueError(f"{fn}: dim must be even (sin and cos interleave), got {dim}")
    base = checks.check_positive_float(fn, "base", base)
    out_dtype = _dtype(fn, dtype)
    pos = torch.arange(seq_len, dtype=torch.float64)[:, None]  # (S, 1)
    angle = pos / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (S, D/2)
    pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)  # (S, D/2, 2): sin at 2i, cos at 2i+1
    return pe.reshape(seq_len, dim).to(out_dtype)


def rope_frequencies(dim, /, *, theta=10000.0, scaling=None, dtype="float32"):
    return torch.from_numpy(frequency_table(dim, theta=theta, scaling=scaling)).to(_dtype("rope_frequencies", dtype))


def _cos_sin(fn, x, positions, theta, r, scaling, sign):
    """cos and sin of the angles, (B|1, S, 1, r/2) in the compute dtype (angles themselves in float32)."""
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device)
    positions = as_int(fn, "positions", positions, device=x.device)
    if positions.device != x.device:
        raise TypeError(f"{fn}: inputs must be on one device, got x={x.device}, positions={positions.device}")
    if positions.ndim == 1:
        positions = positions[None, :]  # (1, S)
    cd = compute_dtype(x.dtype)
    inv_freq = torch.from_numpy(frequency_table(r, theta=theta, scaling=scaling)).to(x.device, torch.float32)
    angle = (positions.to(torch.float32)[..., None] * inv_freq).to(cd)  # (B|1, S, r/2), float32 as pinned
    mscale = yarn_attention_factor(scaling)
    return (torch.cos(angle) * mscale)[:, :, None, :], (torch.sin(angle) * (mscale * sign))[:, :, None, :]


def _rotate(x, cos, sin, style, r):
    xc = x.to(cos.dtype)
    out = xc.clone()
    if style == "interleaved":
        a, b = xc[..., 0:r:2], xc[..., 1:r:2]  # pairs (2i, 2i + 1)
        out[..., 0:r:2] = a * cos - b * sin
        out[..., 1:r:2] = a * sin + b * cos
    else:
        h = r // 2
        a, b = xc[..., :h], xc[..., h:r]  # pairs (i, i + r/2)
        out[..., :h] = a * cos - b * sin
        out[..., h:r] = a * sin + b * cos
    return out.to(x.dtype)


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, style, r):
        ctx.save_for_backward(cos, sin)
        ctx.style, ctx.r = style, r
        return _rotate(x, cos, sin, style, r)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # RoPE is a rotation R (times YaRN's factor m): the VJP is m·Rᵀ = m·R(−angle).
        return _rotate(dy, cos, -sin, ctx.style, ctx.r), None, None, None, None


def _prepare(fn, x, positions, theta, style, rotary_dim, scaling, sign):
    x = as_float(fn, "dy" if sign < 0 else "x", x)
    pos_shape = None if positions is None else tuple(torch.as_tensor(positions).shape)
    r = checks.rope(fn, tuple(x.shape), pos_shape, style, rotary_dim)
    cos, sin = _cos_sin(fn, x, positions, theta, r, scaling, sign)
    return x, cos, sin, r


def rope(x, /, *, positions=None, theta=10000.0, style="interleaved", rotary_dim=None, scaling=None):
    x, cos, sin, r = _prepare("rope", x, positions, theta, style, rotary_dim, scaling, +1.0)
    return Rope.apply(x, cos, sin, style, r)


def rope_backward(dy, /, *, positions=None, theta=10000.0, style="interleaved", rotary_dim=None, scaling=None):
    dy, cos, sin, r = _prepare("rope_backward", dy, positions, theta, style, rotary_dim, scaling, -1.0)
    return _rotate(dy, cos, sin, style, r)
