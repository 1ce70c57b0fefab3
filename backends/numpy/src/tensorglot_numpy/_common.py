"""Input coercion for `parallel`, whose step checks its own inputs (the spec's front ends check the rest)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_float(fn: str, arg: str, x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{fn}: {arg} has dtype {arr.dtype}, wanted a floating dtype (float64, float32, float16)")
    return arr
