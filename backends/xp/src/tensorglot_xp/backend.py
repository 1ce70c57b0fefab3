"""The xp backend object: the spec's front ends over kernels written only against the Array API standard.

The kernels take their namespace from their inputs (`tensorglot.kernels.namespace`), so one text runs on every
namespace; the backend object only picks which one `asarray` creates (``TENSORGLOT_XP_NAMESPACE``).
"""

from __future__ import annotations

import importlib
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj

from tensorglot import checks
from tensorglot.backend import ArrayBackend
from tensorglot.kernels import namespace

from . import encodings, flash, layers, ops
from .plugin import CAPABILITIES, namespace_name

_DTYPE_NAMES = (*checks.FLOAT_DTYPES, *checks.INT_DTYPES, "bool")


def load_namespace(name: str) -> ModuleType:
    """The namespace ``name`` as `array_namespace` gives it for its own arrays: array_api_compat's wrapper
    where there is one (numpy, torch, cupy, dask.array), else the module itself (array_api_strict)."""
    try:
        module = importlib.import_module(f"array_api_compat.{name}")
    except ImportError:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"TENSORGLOT_XP_NAMESPACE: cannot import the array namespace {name!r}: {exc}") from exc
    return array_namespace(module.asarray(0.0))


def _defined_in(value: Any, module: ModuleType) -> bool:
    return callable(value) and getattr(value, "__module__", None) == module.__name__ and value.__name__[0] != "_"


class XpBackend(ArrayBackend):
    name = "xp"
    kernels = SimpleNamespace(
        **{k: v for m in (ops, flash, encodings, layers) for k, v in vars(m).items() if _defined_in(v, m)}
    )
    parallel = None

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace or namespace_name()
        self.xp = load_namespace(self.namespace)
        self._dtypes = {n: getattr(self.xp, n) for n in _DTYPE_NAMES if hasattr(self.xp, n)}
        self.capabilities = CAPABILITIES | ({"float16"} if "float16" in self._dtypes else set())
        super().__init__()

    def asarray(self, x: Any, /, dtype: str | None = None) -> Any:
        if dtype is None:
            return self.xp.asarray(x)
        if dtype not in self._dtypes:
            have = ", ".join(self._dtypes)
            raise TypeError(f"asarray: the xp backend on {self.namespace} has no dtype {dtype!r} (it has {have})")
        return self.xp.asarray(x, dtype=self._dtypes[dtype])

    def native(self, x: Any, /) -> Any:
        return x if is_array_api_obj(x) and namespace(x) is self.xp else self.xp.asarray(x)

    def to_numpy(self, x: Any, /) -> np.ndarray:
        # DLPack is the standard's way out of a namespace; NumPy's own arrays need no exchange.
        return np.asarray(x) if isinstance(x, np.ndarray | np.generic) else np.from_dlpack(x)

    def dtype_name(self, x: Any, /) -> str:
        dtype = self.native(x).dtype
        return next((n for n, d in self._dtypes.items() if d == dtype), str(dtype))

    def astype(self, x: Any, dtype: str, /) -> Any:
        want = self._dtypes[dtype]
        return x if x.dtype == want else self.xp.astype(x, want)

    def device(self, x: Any, /) -> Any:
        return device(x)

    def __repr__(self) -> str:
        return f"<tensorglot backend 'xp' on {self.namespace}>"
