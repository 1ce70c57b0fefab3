"""The shared style and the deterministic PNG writer.

Every figure is drawn inside `context()` (Agg, ``style.mplstyle``) and written by `save`, which strips
what would make two renders of the same data differ (the Software tag; PNG has no timestamp unless
asked), so the gallery only changes when the numbers do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files, never shown

import matplotlib.pyplot as plt

STYLE = Path(__file__).with_name("style.mplstyle")
#: The seed of every random input a figure draws.
SEED = 0

#: Colours by meaning, so the same thing looks the same in every figure.
COLORS = {
    "interleaved": "#1f77b4",
    "neox": "#d62728",
    "scaled": "#2ca02c",
    "forward": "#1f77b4",
    "backward": "#ff7f0e",
    "idle": "#d9d9d9",
}


@contextmanager
def context() -> Iterator[None]:
    """The shared rcParams; a figure's ``draw`` creates and fills its axes inside this block."""
    with plt.style.context(STYLE):
        yield


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG with no run-dependent metadata, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with context():
        fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
