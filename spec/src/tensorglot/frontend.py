"""The machinery every front end shares: converting, validating and casting inputs before a kernel runs.

A public function of the spec (``be.ops.softmax``, ``be.encodings.rope``, ...) is written once, as a
method of a front-end class (`tensorglot.ops.Ops`, `tensorglot.encodings.Encodings`) bound to one
backend. It converts its inputs to the backend's arrays, validates them with `tensorglot.checks`,
normalises its options (a NumPy scalar is a number; an axis is normalised once), picks the compute
dtype and calls the backend's kernel (`tensorglot.kernels`). So every backend raises the same error
for the same bad input and applies one dtype rule, by construction:

  * every floating array input of one call — ``dy`` included — has one dtype, or a TypeError names them;
  * float16 and bfloat16 are computed in float32 inside (the kernel sees float32) and cast back;
    float32 and float64 are computed as they are.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import checks
from .backend import ArrayBackend
from .kernels import namespace

Array = Any
HALF = ("float16", "bfloat16")


def compute_dtype(dtype: str) -> str:
    """The dtype a kernel computes in: half precision in float32, the rest as it is."""
    return "float32" if dtype in HALF else dtype


class FrontEnd:
    """Bound to one backend: its kernels (``backend.kernels``) and its array adapter (the backend object)."""

    def __init__(self, backend: Any) -> None:
        self._be = backend
        self._k = backend.kernels
        # Only a library with several devices needs the device check (it costs on every call).
        self._devices = getattr(type(backend), "device", ArrayBackend.device) is not ArrayBackend.device

    def __repr__(self) -> str:
        return f"<tensorglot {type(self).__name__.lower()} of backend {self._be.name!r}>"

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # A front end goes to another process by name (its kernels may be closures, which do not pickle):
        # there it is the same namespace of that process's own backend.
        for name in ("ops", "encodings", "layers"):
            if getattr(self._be, name, None) is self:
                return _namespace_of, (self._be.name, name)
        raise TypeError(f"{self!r} is no namespace of its backend, so it cannot be pickled")

    # -- inputs -------------------------------------------------------------------------------------

    def _array(self, x: Any) -> Array:
        return self._be.native(x)

    def _float(self, fn: str, arg: str, x: Any) -> tuple[Array, str]:
        x = self._be.native(x)
        dtype = self._be.dtype_name(x)
        checks.check_float(fn, arg, dtype)
        return x, dtype

    def _floats(self, fn: str, **arrays: Any) -> tuple[list[Array | None], str]:
        """Convert and check every present array; they must share one float dtype (and device)."""
        out: list[Array | None] = []
        dtypes: dict[str, str] = {}
        for arg, x in arrays.items():
            if x is None:
                out.append(None)
                continue
            x, dtypes[arg] = self._float(fn, arg, x)
            out.append(x)
        checks.check_same_dtype(fn, dtypes)
        self._same_device(fn, {a: x for a, x in zip(arrays, out) if x is not None})
        return out, next(iter(dtypes.values()))

    def _int(self, fn: str, arg: str, x: Any) -> Array:
        x = self._ints(fn, arg, x)
        checks.check_int(fn, arg, self._be.dtype_name(x))
        return x

    def _ints(self, fn: str, arg: str, x: Any) -> Array:
        """x as this backend's array; a Python list goes through NumPy first, so one with an int too large
        for int64 (an object array) or with floats is refused alike on every backend, never a framework's
        overflow."""
        if isinstance(x, list | tuple):
            x = np.asarray(x)
            if x.dtype.kind not in "iu":
                checks.check_int(fn, arg, x.dtype.name)
        return self._be.native(x)

    def _bool(self, fn: str, arg: str, x: Any) -> Array:
        x = self._be.native(x)
        checks.check_bool(fn, arg, self._be.dtype_name(x))
        return x

    def _same_device(self, fn: str, arrays: dict[str, Array]) -> None:
        if not self._devices:
            return
        devices = {arg: self._be.device(x) for arg, x in arrays.items()}
        if len(set(devices.values())) > 1:
            got = ", ".join(f"{k}={d}" for k, d in devices.items())
            raise TypeError(f"{fn}: inputs must be on one device, got {got}")

    # -- options ------------------------------------------------------------------------------------

    def _static(self, fn: str, arg: str, value: Any) -> Any:
        """Options select the computation, so they are Python values, never traced arrays (JAX)."""
        if self._be.is_traced(value):
            raise TypeError(
                f"{fn}: {arg} is an option and must be a static Python value, got a traced array; close "
                f"over it or mark it static: jax.jit(f, static_argnames=('{arg}',))"
            )
        return value.item() if isinstance(value, np.generic) else value  # a NumPy scalar is the number it holds

    def _bool_option(self, fn: str, arg: str, value: Any) -> bool:
        value = self._static(fn, arg, value)
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {arg} must be a bool, got {type(value).__name__}")
        return value

    def _index(self, fn: str, arg: str, value: Any, *, allow_zero: bool = False) -> int:
        return checks.check_positive_int(fn, arg, self._static(fn, arg, value), allow_zero=allow_zero)

    def _positive(self, fn: str, arg: str, value: Any) -> float:
        return checks.check_positive_float(fn, arg, self._static(fn, arg, value))

    def _finite(self, fn: str, arg: str, value: Any) -> float:
        value = self._static(fn, arg, value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{fn}: {arg} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{fn}: {arg} must be finite, got {value}")
        return float(value)

    def _axis(self, fn: str, axis: Any, ndim: int) -> int:
        axis = self._static(fn, "axis", axis)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"{fn}: axis must be an int, got {type(axis).__name__}")
        return checks.normalize_axis(fn, operator.index(axis), ndim)

    # -- the call -----------------------------------------------------------------------------------

    def _run(self, kernel: Callable[..., Any], dtype: str, arrays: Sequence[Array | None], *options: Any) -> Any:
        """Call ``kernel(*arrays, *options)`` in the compute dtype and cast its outputs back to ``dtype``."""
        cd = compute_dtype(dtype)
        if cd == dtype:
            return kernel(*arrays, *options)
        astype = self._be.astype
        out = kernel(*(None if a is None else astype(a, cd) for a in arrays), *options)
        if isinstance(out, tuple):
            return tuple(None if o is None else astype(o, dtype) for o in out)
        return astype(out, dtype)


def _namespace_of(backend: str, namespace: str) -> Any:
    from .registry import get_backend

    return getattr(get_backend(backend), namespace)


def index_ids(ids: Array) -> Array:
    """Validated token ids as an index dtype (int32 unless int32 or int64): every library gathers with
    them, and torch would read uint8 as a bool mask."""
    xp = namespace(ids)
    return ids if ids.dtype in (xp.int32, xp.int64) else xp.astype(ids, xp.int32)


def shape(x: Array) -> tuple[int, ...]:
    return tuple(x.shape)  # ints on every library; called several times per op, so kept cheap
