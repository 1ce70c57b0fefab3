"""The sinusoidal encoding of "Attention Is All You Need" as a heatmap: position × dimension."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from . import style

MEASURED: frozenset[str] = frozenset()
SEQ_LEN, DIM = 128, 64


def data(backend: Any) -> dict[str, Any]:
    pe = backend.to_numpy(backend.encodings.sinusoidal(SEQ_LEN, DIM, dtype="float32"))  # (S, D)
    return {"pe": pe.astype("float64"), "base": 10000.0}


def draw(d: dict[str, Any]) -> Any:
    pe = d["pe"]
    with style.context():
        fig, ax = plt.subplots(figsize=(8, 5))
        im = ax.imshow(pe, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="upper", interpolation="nearest")
        ax.grid(False)
        ax.set_title(f"Sinusoidal position encoding (S = {pe.shape[0]}, D = {pe.shape[1]}, base {d['base']:g})")
        ax.set_xlabel("feature index (even: sin, odd: cos); period grows with index")
        ax.set_ylabel("position p (tokens)")
        fig.colorbar(im, ax=ax, label="PE[p, feature] (unitless)")
    return fig
