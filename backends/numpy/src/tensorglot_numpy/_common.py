"""Helpers shared by the NumPy modules: input coercion and the compute dtype."""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorglot import checks


def as_float(fn: str, arg: str, x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{fn}: {arg} has dtype {arr.dtype}, wanted a floating dtype (float64, float32, float16)")
    return arr


def as_int(fn: str, arg: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    checks.check_int(fn, arg, str(arr.dtype))
    return arr


def compute_dtype(dtype: np.dtype) -> type:
    """float64 stays float64; everything else is computed in float32."""
    return np.float64 if dtype == np.float64 else np.float32


def same_dtype(fn: str, **arrays: np.ndarray | None) -> np.dtype:
    present = {k: str(v.dtype) for k, v in arrays.items() if v is not None}
    checks.check_same_dtype(fn, present)
    return next(v.dtype for v in arrays.values() if v is not None)


def flat2d(x: np.ndarray) -> np.ndarray:
    """(..., n) → (prod(...), n), for weight gradients that sum over every leading axis."""
    return x.reshape(-1, x.shape[-1])


def lazy_frontend(namespace: str) -> Any:
    """The spec's front end ``namespace`` of the NumPy backend, looked up on first use (no import cycle)."""

    class _Lazy:
        def __getattr__(self, name: str) -> Any:
            import tensorglot

            return getattr(getattr(tensorglot.get_backend("numpy"), namespace), name)

    return _Lazy()
