"""Shared by the RoPE figures: rotate one fixed vector at every position through the backend's `rope`."""

from __future__ import annotations

from typing import Any

import numpy as np


def rotate_at_positions(backend: Any, vector: np.ndarray, positions: np.ndarray, **rope_options: Any) -> np.ndarray:
    """``rope`` of ``vector`` (H,) placed at each of ``positions``: returns (P, H) float64."""
    p, h = len(positions), vector.shape[0]
    x = np.broadcast_to(vector, (1, p, 1, h)).astype(np.float32)  # (B=1, S=P, N=1, H)
    y = backend.encodings.rope(
        backend.asarray(x, "float32"), positions=backend.asarray(positions.astype(np.int64), "int64"), **rope_options
    )
    return np.asarray(backend.to_numpy(y), dtype=np.float64).reshape(p, h)  # (P, H)
