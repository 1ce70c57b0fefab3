"""JAX encodings: see the spec, `tensorglot.encodings` (RoPE pairing and angle precision are pinned there)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tensorglot import checks
from tensorglot.encodings import frequency_table, yarn_attention_factor

from ._common import as_float, as_int, compute_dtype, static

_FLOAT = {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _dtype(fn, dtype):
    if dtype not in _FLOAT:
        raise TypeError(f"{fn}: dtype must be one of {', '.join(_FLOAT)} on the jax backend, got {dtype!r}")
    if dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise TypeError(f"{fn}: dtype float64 needs JAX's x64 mode (JAX_ENABLE_X64=1)")
    return _FLOAT[dtype]


def sinusoidal(seq_len, dim, /, *, base=10000.0, dtype="float32"):
    fn = "sinusoidal"
    seq_len = checks.check_positive_int(fn, "seq_len", static(fn, "seq_len", seq_len), allow_zero=True)
    dim = checks.check_positive_int(fn, "dim", static(fn, "dim", dim))
    if dim % 2:
        raise ValueError(f"{fn}: dim must be even (sin and cos interleave), got {dim}")
    base = checks.check_positive_float(fn, "base", static(fn, "base", base))
    out_dtype = _dtype(fn, dtype)
    # A table of static sizes: computed once in float64 NumPy, a constant under jit.
    pos = np.arange(seq_len, dtype=np.float64)[:, None]  # (S, 1)
    angle = pos / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # (S, D/2)
    pe = np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(seq_len, dim)  # (S, D) interleaved
    return jnp.asarray(pe, dtype=out_dtype)


def rope_frequencies(dim, /, *, theta=10000.0, scaling=None, dtype="float32"):
    fn = "rope_frequencies"
    table = frequency_table(static(fn, "dim", dim), theta=static(fn, "theta", theta), scaling=scaling)
    return jnp.asarray(table, dtype=_dtype(fn, dtype))


def _rotate(x, cos, sin, style, r):
    """(a, b) → (a cos − b sin, a sin + b cos) on the pairs of the first r features.

    cos and sin are (B|1, S, 1, r/2); the features past r pass through."""
    if style == "interleaved":
        a, b = x[..., 0:r:2], x[..., 1:r:2]  # pairs (2i, 2i + 1)
        rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(*x.shape[:-1], r)
    else:
        a, b = x[..., : r // 2], x[..., r // 2 : r]  # pairs (i, i + r/2)
        rotated = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return jnp.concatenate([rotated, x[..., r:]], axis=-1) if r < x.shape[-1] else rotated


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rope(x, cos, sin, style, r):
    return _rotate(x.astype(cos.dtype), cos, sin, style, r).astype(x.dtype)


def _rope_fwd(x, cos, sin, style, r):
    return _rope(x, cos, sin, style, r), (cos, sin)


def _rope_bwd(style, r, res, dy):
    # RoPE is a rotation R (times YaRN's factor m): the VJP is m·Rᵀ = m·R(−angle).
    cos, sin = res
    return _rope(dy, cos, -sin, style, r), None, None


_rope.defvjp(_rope_fwd, _rope_bwd)


def _tables(fn, x, positions, theta, style, rotary_dim, scaling):
    """Validates; returns (r, cos, sin) with cos, sin (B|1, S, 1, r/2) in x's compute dtype."""
    static(fn, "style", style)
    pos_shape = None if positions is None else jnp.shape(positions)
    r = checks.rope(fn, x.shape, pos_shape, style, static(fn, "rotary_dim", rotary_dim))
    positions = jnp.arange(x.shape[1]) if positions is None else as_int(fn, "positions", positions)
    if positions.ndim == 1:
        positions = positions[None, :]  # (1, S)
    cd = compute_dtype(x.dtype)
    inv_freq = frequency_table(r, theta=static(fn, "theta", theta), scaling=scaling).astype(np.float32)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # (B|1, S, r/2), float32 as pinned
    mscale = yarn_attention_factor(scaling)
    cos = (jnp.cos(angle.astype(cd)) * mscale)[:, :, None, :]  # (B|1, S, 1, r/2)
    sin = (jnp.sin(angle.astype(cd)) * mscale)[:, :, None, :]
    return r, cos, sin


def rope(x, /, *, positions=None, theta=10000.0, style="interleaved", rotary_dim=None, scaling=None):
    x = as_float("rope", "x", x)
    r, cos, sin = _tables("rope", x, positions, theta, style, rotary_dim, scaling)
    return _rope(x, cos, sin, style, r)


def rope_backward(dy, /, *, positions=None, theta=10000.0, style="interleaved", rotary_dim=None, scaling=None):
    dy = as_float("rope_backward", "dy", dy)
    r, cos, sin = _tables("rope_backward", dy, positions, theta, style, rotary_dim, scaling)
    return _rope(dy, cos, -sin, style, r)
