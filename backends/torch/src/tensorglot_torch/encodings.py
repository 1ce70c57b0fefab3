"""PyTorch encoding kernels: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned)."""

from __future__ import annotations

import torch

from ._common import kernel

#: cos and sin tables of recent calls. A layer's q and k, and every layer of a model, rotate by the same
#: positions, so each distinct (positions, frequencies) pair is computed once. A positions tensor is
#: keyed by identity and version (an in-place write misses), and the entry holds it, so its id stays its own.
_TABLES: dict[tuple, tuple] = {}


def _cos_sin(x, positions, inv_freq, mscale):
    """mscale·cos and mscale·sin of the angles, (B|1, S, 1, r/2) in x's dtype (the angles in float32)."""
    key = None
    # a compiled graph computes the tables itself; an inference tensor keeps no version to key on
    if not torch.compiler.is_compiling() and (positions is None or not positions.is_inference()):
        which = x.shape[1] if positions is None else (id(positions), positions._version)
        key = (which, inv_freq.tobytes(), mscale, x.dtype, x.device, torch.is_inference_mode_enabled())
        hit = _TABLES.get(key)
        if hit is not None and hit[0] is positions:
            return hit[1:]
    p = torch.arange(x.shape[1], device=x.device) if positions is None else positions
    p = p[None] if p.ndim == 1 else p  # (B|1, S)
    angle = (p.to(torch.float32)[..., None] * torch.tensor(inv_freq, device=x.device)).to(x.dtype)  # (B|1, S, r/2)
    cos, sin = (torch.cos(angle) * mscale)[:, :, None], (torch.sin(angle) * mscale)[:, :, None]
    if key is not None:
        if len(_TABLES) >= 32:
            _TABLES.clear()
        _TABLES[key] = (positions, cos, sin)
    return cos, sin


def _rotate(x, cos, sin, sign, style, r):
    """Pair i turned by sign · angle_i: (a, b) → (a cos − sign·b sin, sign·a sin + b cos)."""
    rot = x if r == x.shape[-1] else x.narrow(-1, 0, r)
    # interleaved pairs (2i, 2i + 1), neox pairs (i, i + r/2)
    a, b = rot.unflatten(-1, (-1, 2)).unbind(-1) if style == "interleaved" else rot.chunk(2, -1)
    ra, rb = torch.addcmul(a * cos, b, sin, value=-sign), torch.addcmul(b * cos, a, sin, value=sign)
    rotated = torch.stack((ra, rb), -1).flatten(-2) if style == "interleaved" else torch.cat((ra, rb), -1)
    return rotated if rot is x else torch.cat((rotated, x.narrow(-1, r, x.shape[-1] - r)), -1)


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq, mscale, sign, style, r):
        cos, sin = _cos_sin(x, positions, inv_freq, mscale)
        ctx.save_for_backward(cos, sin)
        ctx.sign, ctx.style, ctx.r = sign, style, r
        return _rotate(x, cos, sin, sign, style, r)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # RoPE is a rotation R (times YaRN's factor m): the VJP is m·Rᵀ, the rotation the other way.
        return _rotate(dy, cos, sin, -ctx.sign, ctx.style, ctx.r), None, None, None, None, None, None


rope = kernel(Rope)
