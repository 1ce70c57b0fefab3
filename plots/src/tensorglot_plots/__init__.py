"""tensorglot-plots: one module per figure, each with ``data(backend)`` and ``draw(data)``.

``data(backend)`` computes what is drawn through the backend's public spec API and returns a dict of
NumPy arrays and plain numbers; ``draw(data)`` turns that dict into a matplotlib figure. Keys listed in
a module's ``MEASURED`` are measured on this machine or backend (timings, what a backend's capabilities
let it run): they differ run to run or backend to backend. Every other key is a deterministic function
of the spec and agrees across backends.

Importing this package imports neither matplotlib nor any framework: `render` does, on first use.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

#: Figure names, in gallery order; each is a module of this package.
FIGURES = (
    "sinusoidal",
    "rope_interleaved",
    "rope_neox",
    "rope_decay",
    "attention_masks",
    "mlp_roofline",
    "attention_roofline",
    "sharding_costs",
    "pipeline_schedules",
    "transformer_strategies",
    "kv_cache",
    "serving_goodput",
)


class FigureSkipped(Exception):
    """A figure cannot be computed on this backend or install; the message says what it needs."""


def figure(name: str) -> ModuleType:
    """The module of figure ``name``."""
    if name not in FIGURES:
        raise ValueError(f"plots: unknown figure {name!r}; figures are {', '.join(FIGURES)}")
    return importlib.import_module(f"{__name__}.{name}")


def require_capability(backend: Any, capability: str, figure_name: str) -> None:
    """Raise `FigureSkipped` naming ``capability`` when ``backend`` does not declare it."""
    if capability not in backend.capabilities:
        raise FigureSkipped(f"{figure_name}: backend {backend.name!r} lacks the capability {capability!r}")


def render(name: str, backend: Any, out_dir: str | Path) -> tuple[Path, float]:
    """Compute, draw and save figure ``name`` as ``out_dir/<name>.png``; returns (path, seconds)."""
    from . import style

    module = figure(name)
    start = time.perf_counter()
    data = module.data(backend)
    path = Path(out_dir) / f"{name}.png"
    style.save(module.draw(data), path)
    return path, time.perf_counter() - start
