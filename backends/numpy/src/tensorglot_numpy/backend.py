"""The NumPy backend object: its namespaces are this package's modules, named as the spec's."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import encodings, layers, ops, parallel

CAPABILITIES = frozenset({"float64", "float16", "layers", "dp", "tp", "fsdp", "pp", "flash"})

_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


class NumpyBackend:
    name = "numpy"
    capabilities = CAPABILITIES
    ops = ops
    encodings = encodings
    layers = layers
    parallel = parallel

    def asarray(self, x: Any, /, dtype: str | None = None) -> np.ndarray:
        if dtype is None:
            return np.asarray(x)
        if dtype not in _DTYPES:
            raise TypeError(f"asarray: the numpy backend has no dtype {dtype!r} (it has {', '.join(_DTYPES)})")
        return np.asarray(x, dtype=_DTYPES[dtype])

    def to_numpy(self, x: Any, /) -> np.ndarray:
        return np.asarray(x)

    def dtype_name(self, x: Any, /) -> str:
        return str(np.asarray(x).dtype)

    def __repr__(self) -> str:
        return "<tensorglot backend 'numpy'>"
