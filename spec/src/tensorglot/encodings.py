"""The encodings namespace: sinusoidal position encodings and rotary embeddings (RoPE).

RoPE conventions (pinned, because they are where implementations silently disagree):
  * ``interleaved`` (GPT-J, Meta's original Llama): features (2i, 2i + 1) form pair i.
  * ``neox`` (GPT-NeoX, Hugging Face Llama, "rotate_half"): features (i, i + r/2) form pair i.
  * Only the first ``rotary_dim`` = r features rotate; the rest pass through unchanged.
  * Pair i at position p is rotated by **+**angle p·θ_i (counter-clockwise):
    ``(a, b) → (a cos − b sin, a sin + b cos)``.
  * Angles are computed in float32 (``float32(p) * float32(θ_i)``, rounded to float32), as Hugging
    Face does, whatever the input dtype; cos and sin are then evaluated in the compute dtype.

This module also holds `frequency_table`, the backend-independent float64 computation of the
inverse frequencies with every scaling (linear, dynamic NTK, YaRN, Llama 3); backends cast it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from . import checks
from .frontend import FrontEnd, shape

Array = Any
RopeStyle = Literal["interleaved", "neox"]


class Encodings(FrontEnd):
    """The encodings of one backend: ``Encodings(backend)`` is ``backend.encodings``."""

    def sinusoidal(self, seq_len: int, dim: int, /, *, base: float = 10000.0, dtype: str = "float32") -> Array:
        r"""The fixed encoding of "Attention Is All You Need" (arXiv:1706.03762), interleaved layout:
        ``PE[p, 2i] = sin(p / base^(2i/D))`` and ``PE[p, 2i+1] = cos(p / base^(2i/D))``.

        Args:
            seq_len: S >= 0.  dim: D > 0, even.  base: > 0.  dtype: a float dtype name.
        Returns:
            (S, D).

        >>> import numpy as np, tensorglot
        >>> pe = tensorglot.get_backend("numpy").encodings.sinusoidal(2, 4)
        >>> print(np.round(pe, 4))
        [[0.     1.     0.     1.    ]
         [0.8415 0.5403 0.01   1.    ]]
        """
        fn = "sinusoidal"
        seq_len = self._index(fn, "seq_len", seq_len, allow_zero=True)
        dim = self._index(fn, "dim", dim)
        if dim % 2:
            raise ValueError(f"{fn}: dim must be even (sin and cos interleave), got {dim}")
        base = self._positive(fn, "base", base)
        checks.check_choice(fn, "dtype", dtype, checks.FLOAT_DTYPES)
        pos = np.arange(seq_len, dtype=np.float64)[:, None]  # (S, 1)
        angle = pos / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # (S, D/2)
        pe = np.empty((seq_len, dim), dtype=np.float64)
        pe[:, 0::2] = np.sin(angle)
        pe[:, 1::2] = np.cos(angle)
        return self._be.asarray(pe, dtype)

    def rope_frequencies(
        self,
        dim: int,
        /,
        *,
        theta: float = 10000.0,
        scaling: Mapping[str, Any] | None = None,
        dtype: str = "float32",
    ) -> Array:
        r"""Inverse frequencies ``θ_i = theta^(-2i/dim)``, i < dim/2, optionally scaled.

        ``scaling`` takes the Hugging Face ``rope_scaling`` keys so a model's config carries over:
          * ``{"type": "linear", "factor": f}``: θ_i / f (position interpolation, arXiv:2306.15595).
          * ``{"type": "dynamic", "factor": f, "original_max_position_embeddings": L}``: NTK-aware base
            ``theta · (f·s/L − (f − 1))^(dim/(dim−2))`` for a context of s = ``seq_len`` tokens (key
            ``seq_len``, default L; HF recomputes s from each input, which would make the frequencies
            depend on data, so here it is an explicit, static option).
          * ``{"type": "yarn", "factor": f, "original_max_position_embeddings": L, "beta_fast": 32,
            "beta_slow": 1}``: YaRN's ramp between interpolation and extrapolation (arXiv:2309.00071);
            `rope` also scales cos and sin by `yarn_attention_factor`.
          * ``{"type": "llama3", "factor": f, "original_max_position_embeddings": L,
            "low_freq_factor": 1, "high_freq_factor": 4}``: Llama 3.1's band-wise scaling.

        Returns:
            (dim // 2,) in ``dtype``.

        >>> import numpy as np, tensorglot
        >>> enc = tensorglot.get_backend("numpy").encodings
        >>> print(enc.rope_frequencies(4, theta=100.0))
        [1.  0.1]
        >>> print(enc.rope_frequencies(4, theta=100.0, scaling={"type": "linear", "factor": 2.0}))
        [0.5  0.05]
        """
        fn = "rope_frequencies"
        checks.check_choice(fn, "dtype", dtype, checks.FLOAT_DTYPES)
        theta = self._positive(fn, "theta", theta)
        return self._be.asarray(frequency_table(dim, theta=theta, scaling=scaling), dtype)

    def rope(
        self,
        x: Array,
        /,
        *,
        positions: Array | None = None,
        theta: float = 10000.0,
        style: RopeStyle = "interleaved",
        rotary_dim: int | None = None,
        scaling: Mapping[str, Any] | None = None,
    ) -> Array:
        r"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864).

        Pair i of the first r = ``rotary_dim`` features at position p is rotated by +p·θ_i; which
        features pair up depends on ``style`` (see the module docstring). Keeps norms (except YaRN,
        whose cos and sin are scaled by `yarn_attention_factor`); q·k after RoPE depends only on the
        difference of positions.

        Args:
            x: (B, S, N, H).  positions: (S,) or (B, S) ints, default arange(S).  rotary_dim: even,
            <= H, default H.
        Returns:
            x's shape and dtype.

        >>> import numpy as np, tensorglot
        >>> enc = tensorglot.get_backend("numpy").encodings
        >>> x = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
        >>> print(np.round(enc.rope(x, positions=np.array([1]), theta=1.0).ravel(), 4))
        [0.5403 0.8415]
        """
        return self._rotate("rope", "x", x, positions, theta, style, rotary_dim, scaling, 1.0)

    def rope_backward(
        self,
        dy: Array,
        /,
        *,
        positions: Array | None = None,
        theta: float = 10000.0,
        style: RopeStyle = "interleaved",
        rotary_dim: int | None = None,
        scaling: Mapping[str, Any] | None = None,
    ) -> Array:
        r"""The VJP of `rope`: RoPE is linear in x, so dx is dy rotated by −angle (times YaRN's factor).

        >>> import numpy as np, tensorglot
        >>> enc = tensorglot.get_backend("numpy").encodings
        >>> dy = np.array([0.0, 1.0]).reshape(1, 1, 1, 2)
        >>> print(np.round(enc.rope_backward(dy, positions=np.array([1]), theta=1.0).ravel(), 4))
        [0.8415 0.5403]
        """
        # RoPE is a rotation R (times YaRN's factor m): the VJP is m·Rᵀ = m·R(−angle).
        return self._rotate("rope_backward", "dy", dy, positions, theta, style, rotary_dim, scaling, -1.0)

    def _rotate(self, fn, arg, x, positions, theta, style, rotary_dim, scaling, sign):
        x, dtype = self._float(fn, arg, x)
        if positions is not None:
            positions = self._int(fn, "positions", positions)
            self._same_device(fn, {arg: x, "positions": positions})
        style, rotary_dim = self._static(fn, "style", style), self._static(fn, "rotary_dim", rotary_dim)
        r = checks.rope(fn, shape(x), None if positions is None else shape(positions), style, rotary_dim)
        theta = self._positive(fn, "theta", theta)
        try:
            key = None if scaling is None else tuple(sorted(scaling.items()))
            hash(key)
        except (AttributeError, TypeError):  # not a dict of plain values: frequency_table says what is wrong
            inv_freq = frequency_table(r, theta=theta, scaling=scaling).astype(np.float32)
        else:
            inv_freq = _float32_table(r, theta, key)  # (r/2,)
        mscale = yarn_attention_factor(scaling)
        return self._run(self._k.rope, dtype, (x,), positions, inv_freq, mscale, sign, style, r)


NAMES = ("sinusoidal", "rope_frequencies", "rope", "rope_backward")


@functools.lru_cache(maxsize=256)
def _float32_table(r: int, theta: float, scaling: tuple[tuple[str, Any], ...] | None) -> np.ndarray:
    """`frequency_table` in float32, kept per (r, theta, scaling): RoPE runs twice per layer per decode step."""
    table = frequency_table(r, theta=theta, scaling=None if scaling is None else dict(scaling)).astype(np.float32)
    table.flags.writeable = False  # shared between calls
    return table


def yarn_attention_factor(scaling: Mapping[str, Any] | None) -> float:
    """YaRN's ``mscale``: the factor on cos and sin, 1 for every other scaling (HF's rules).

    >>> round(yarn_attention_factor({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), 4)
    1.1386
    """
    s = checks.rope_scaling("yarn_attention_factor", scaling)
    if s is None or s["type"] != "yarn":
        return 1.0
    if s["attention_factor"] is not None:
        return float(s["attention_factor"])

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = s["factor"]
    if s["mscale"] and s["mscale_all_dim"]:
        return get_mscale(factor, s["mscale"]) / get_mscale(factor, s["mscale_all_dim"])
    return get_mscale(factor)


def frequency_table(dim: int, /, *, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """`Encodings.rope_frequencies` in float64 NumPy; every backend casts this (it depends on no input array).

    >>> print(frequency_table(4, theta=100.0))
    [1.  0.1]
    """
    fn = "rope_frequencies"
    dim = checks.check_positive_int(fn, "dim", dim)
    if dim % 2:
        raise ValueError(f"{fn}: dim must be even, got {dim}")
    theta = checks.check_positive_float(fn, "theta", theta)
    s = checks.rope_scaling(fn, scaling)
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim  # 2i / dim
    inv_freq = theta**-exponents
    if s is None:
        return inv_freq
    factor = s["factor"]
    kind = s["type"]
    if kind == "linear":
        return inv_freq / factor
    orig = s["original_max_position_embeddings"]
    if kind == "dynamic":
        seq_len = max(s["seq_len"], orig)
        if dim <= 2:
            return inv_freq
        base = theta * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        return base**-exponents
    if kind == "llama3":
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = orig / low, orig / high
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)

    # yarn: blend interpolation (θ/f) and extrapolation (θ) with a linear ramp over the pair index.
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo = float(max(math.floor(correction_dim(s["beta_fast"])), 0))
    hi = float(min(math.ceil(correction_dim(s["beta_slow"])), dim - 1))
    if lo == hi:
        hi += 0.001  # avoid a division by zero, as HF does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    return (inv_freq / factor) * (1.0 - extrapolation_weight) + inv_freq * extrapolation_weight
