"""GPT-NeoX RoPE with partial rotary: pairs (i, i + r/2) of the first r features; the rest pass through."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style
from ._rope import rotate_at_positions

MEASURED: frozenset[str] = frozenset()
HEAD_DIM, ROTARY_DIM, POSITIONS, THETA = 64, 32, 64, 10000.0
#: pair 0 = features (0, 16) turns 1 rad per token; pair 4 = features (4, 20) theta^(-8/32) = 0.1 rad per token.
PAIRS = (0, 4)
RADII = (1.0, 0.6)


def data(backend: Any) -> dict[str, Any]:
    half = ROTARY_DIM // 2
    options = {"theta": THETA, "style": "neox", "rotary_dim": ROTARY_DIM}
    positions = np.arange(POSITIONS)
    x = np.zeros(HEAD_DIM)
    for pair, r in zip(PAIRS, RADII):
        x[pair] = r  # the pair (i, i + r/2) starts at (r, 0)
    y = rotate_at_positions(backend, x, positions, **options)  # (P, H)
    ones = np.ones(HEAD_DIM)
    shift = rotate_at_positions(backend, ones, positions, **options) - ones  # (P, H)
    freqs = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(ROTARY_DIM, theta=THETA)), np.float64)
    return {
        "positions": positions,
        "pairs": np.array(PAIRS),
        "rotary_dim": ROTARY_DIM,
        "frequencies": freqs[list(PAIRS)],
        "trajectories": np.stack([y[:, [p, p + half]] for p in PAIRS]),  # (pair, P, 2)
        "shift_of_ones": shift,
    }


def draw(d: dict[str, Any]) -> Any:
    colors = (style.COLORS["neox"], style.COLORS["interleaved"])
    r, half = int(d["rotary_dim"]), int(d["rotary_dim"]) // 2
    shift = d["shift_of_ones"]
    with style.context():
        fig, (ax, ax_map) = plt.subplots(
            1, 2, figsize=(10.5, 4.8), layout="constrained", gridspec_kw={"width_ratios": [1, 1.3]}
        )
        for pair, freq, traj, c in zip(d["pairs"], d["frequencies"], d["trajectories"], colors):
            ax.plot(traj[:, 0], traj[:, 1], "-", color=c, lw=0.5, alpha=0.35)
            ax.scatter(traj[:, 0], traj[:, 1], c=d["positions"], cmap="viridis", s=14, zorder=3)
            ax.plot([], [], "-", color=c, lw=2.5, label=f"features ({pair}, {pair + half})\nθ = {freq:.3g} rad/token")
        ax.legend(loc="center", fontsize=8, handlelength=1.2)
        ax.set_aspect("equal")
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_title("Pairs (i, i + r/2) turn on circles (colour: position)")
        ax.set_xlabel("feature i (unitless)")
        ax.set_ylabel("feature i + r/2 (unitless)")
        im = ax_map.imshow(shift, aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2, interpolation="nearest")
        ax_map.grid(False)
        ax_map.axvline(r - 0.5, color="k", lw=1.2, ls="--")
        ax_map.text(
            r + (shift.shape[1] - r) / 2,
            shift.shape[0] * 0.5,
            "pass-through\n(unchanged)",
            ha="center",
            va="center",
            fontsize=9,
        )
        ax_map.set_xticks([0, half, r, shift.shape[1] - 1])
        ax_map.set_title(f"rope(1) − 1: only the first r = {r} features move")
        ax_map.set_xlabel(f"feature index (pair i = features i and i + {half})")
        ax_map.set_ylabel("position p (tokens)")
        fig.colorbar(im, ax=ax_map, label="change of the feature (unitless)", shrink=0.85)
        fig.suptitle(f"RoPE, GPT-NeoX style with partial rotary: head dim {shift.shape[1]}, rotary_dim {r}")
    return fig
