"""Interleaved RoPE (GPT-J, Meta): how a high- and a low-frequency pair (2i, 2i+1) turn with position."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style
from ._rope import rotate_at_positions

MEASURED: frozenset[str] = frozenset()
HEAD_DIM, POSITIONS, THETA = 64, 64, 10000.0
#: pair 0 turns 1 rad per token; pair 8 turns theta^(-16/64) = 0.1 rad per token.
PAIRS = (0, 8)
RADII = (1.0, 0.6)


def data(backend: Any) -> dict[str, Any]:
    x = np.zeros(HEAD_DIM)
    for pair, r in zip(PAIRS, RADII):
        x[2 * pair] = r  # the pair starts at (r, 0)
    positions = np.arange(POSITIONS)
    y = rotate_at_positions(backend, x, positions, theta=THETA, style="interleaved")  # (P, H)
    freqs = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(HEAD_DIM, theta=THETA)), np.float64)
    return {
        "positions": positions,
        "pairs": np.array(PAIRS),
        "frequencies": freqs[list(PAIRS)],
        # (pair, P, 2): the two features of each pair
        "trajectories": np.stack([y[:, [2 * p, 2 * p + 1]] for p in PAIRS]),
    }


def draw(d: dict[str, Any]) -> Any:
    colors = (style.COLORS["neox"], style.COLORS["interleaved"])
    with style.context():
        fig, (ax, ax_angle) = plt.subplots(
            1, 2, figsize=(10.5, 4.8), layout="constrained", gridspec_kw={"width_ratios": [1, 1.2]}
        )
        for pair, freq, traj, c in zip(d["pairs"], d["frequencies"], d["trajectories"], colors):
            label = f"pair {pair} = features ({2 * pair}, {2 * pair + 1}), θ = {freq:.3g} rad/token"
            ax.plot(traj[:, 0], traj[:, 1], "-", color=c, lw=0.5, alpha=0.35)
            sc = ax.scatter(traj[:, 0], traj[:, 1], c=d["positions"], cmap="viridis", s=14, zorder=3)
            ax.annotate(f"pair {pair}", traj[0], xytext=(6, 4), textcoords="offset points", color=c, fontweight="bold")
            angle = np.unwrap(np.arctan2(traj[:, 1], traj[:, 0]))
            ax_angle.plot(d["positions"], angle, "o-", ms=2.5, color=c, label=label)
        ax.set_aspect("equal")
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_title("Each pair turns on a circle")
        ax.set_xlabel("first feature of the pair (unitless)")
        ax.set_ylabel("second feature of the pair (unitless)")
        fig.colorbar(sc, ax=ax, label="position p (tokens)", shrink=0.85)
        ax_angle.set_title("Angle grows linearly: p·θ_i")
        ax_angle.set_xlabel("position p (tokens)")
        ax_angle.set_ylabel("unwrapped rotation angle (rad)")
        ax_angle.legend(loc="upper left")
        fig.suptitle("RoPE, interleaved style: pairs (2i, 2i+1), head dim 64, θ base 10000")
    return fig
