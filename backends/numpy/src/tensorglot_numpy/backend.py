"""The NumPy backend: the reference kernels behind the spec's front ends, and NumPy's array adapter."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from tensorglot.backend import ArrayBackend

from . import layers, ops, parallel

CAPABILITIES = frozenset({"float64", "float16", "layers", "dp", "tp", "fsdp", "pp", "flash"})

_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}

_NAMES: dict[Any, str] = {np.dtype(t): name for name, t in _DTYPES.items()}


class NumpyBackend(ArrayBackend):
    name = "numpy"
    capabilities = CAPABILITIES
    kernels = SimpleNamespace(
        **{k: v for m in (ops, layers) for k, v in vars(m).items() if callable(v) and not k.startswith("_")}
    )
    parallel = parallel

    def asarray(self, x: Any, /, dtype: str | None = None) -> np.ndarray:
        if dtype is None:
            return np.asarray(x)
        if dtype not in _DTYPES:
            raise TypeError(f"asarray: the numpy backend has no dtype {dtype!r} (it has {', '.join(_DTYPES)})")
        return np.asarray(x, dtype=_DTYPES[dtype])

    def native(self, x: Any, /) -> np.ndarray:
        return np.asarray(x)

    def to_numpy(self, x: Any, /) -> np.ndarray:
        return np.asarray(x)

    def dtype_name(self, x: Any, /) -> str:
        dtype = x.dtype if isinstance(x, np.ndarray | np.generic) else np.asarray(x).dtype
        return _NAMES.get(dtype) or str(dtype)  # str(dtype) costs microseconds on every op call

    def astype(self, x: Any, dtype: str, /) -> np.ndarray:
        return x.astype(_DTYPES[dtype], copy=False)
