"""RoPE's relative-position decay: q·k between a query at position d and the same key at position 0."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style
from ._rope import rotate_at_positions

MEASURED: frozenset[str] = frozenset()
HEAD_DIM, THETA, MAX_DISTANCE = 128, 10000.0, 8192
SCALING = {"type": "linear", "factor": 4.0}
#: (label, rope options) per curve; the same q for all, so only the pairing and the frequencies differ.
VARIANTS = (
    ("interleaved", {"style": "interleaved"}),
    ("neox", {"style": "neox"}),
    ("interleaved, linear scaling ×4", {"style": "interleaved", "scaling": SCALING}),
)


def distances() -> np.ndarray:
    """0, then about 60 log-spaced distances per decade up to MAX_DISTANCE tokens."""
    d = np.unique(np.round(np.logspace(0, np.log10(MAX_DISTANCE), 240)).astype(np.int64))
    return np.concatenate([[0], d])


def data(backend: Any) -> dict[str, Any]:
    rng = np.random.default_rng(style.SEED)
    q = rng.standard_normal(HEAD_DIM)
    d = distances()
    curves = {}
    for label, options in VARIANTS:
        # k = q at position 0 is unrotated; rope(q) at position d then dotted with it, normalised by |q|².
        q_rot = rotate_at_positions(backend, q, d, theta=THETA, **options)  # (P, H)
        curves[label] = q_rot @ q.astype(np.float32).astype(np.float64) / (q @ q)
    return {"distances": d, "curves": curves, "head_dim": HEAD_DIM}


def draw(d: dict[str, Any]) -> Any:
    colors = [style.COLORS["interleaved"], style.COLORS["neox"], style.COLORS["scaled"]]
    x = d["distances"]
    with style.context():
        fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
        for (label, curve), c in zip(d["curves"].items(), colors):
            ax.plot(x[1:], curve[1:], "-", color=c, label=label, lw=1.3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(1, x[-1])
        ax.set_title(f"RoPE relative-position decay: q·k falls as the distance grows (head dim {d['head_dim']})")
        ax.set_xlabel("distance between query and key positions (tokens, log scale)")
        ax.set_ylabel("q·k / |q|²  (k = q, unitless)")
        ax.legend(loc="upper right", title="same random q (seed 0)")
    return fig
