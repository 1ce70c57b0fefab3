"""The JAX backend: its kernels behind the spec's front ends, and JAX's array adapter."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tensorglot.backend import ArrayBackend

from . import layers, ops, parallel
from ._common import is_traced
from .generate import JaxLayers
from .plugin import CAPABILITIES

_DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "int32": jnp.int32,
    "int64": jnp.int64,
    "bool": jnp.bool_,
}
_NAMES: dict[Any, str] = {jnp.dtype(t): name for name, t in _DTYPES.items()}


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


class JaxBackend(ArrayBackend):
    name = "jax"
    #: How to get a capability this process lacks (the conformance suite's skip reasons say it).
    capability_hints: ClassVar[dict[str, str]] = {
        "float64": "JAX computes in float64 only with JAX_ENABLE_X64=1 set before it starts"
    }
    kernels = SimpleNamespace(
        **{k: v for m in (ops, layers) for k, v in vars(m).items() if callable(v) and not k.startswith("_")}
    )
    parallel = parallel

    def __init__(self) -> None:
        super().__init__()
        self.layers = JaxLayers(self)  # the spec's, with transformer and generate compiled

    @property  # read-only here: it follows JAX's x64 flag
    def capabilities(self) -> frozenset[str]:  # type: ignore[override]
        # Read at each access: x64 may be switched on with jax.config.update after the backend loaded.
        return CAPABILITIES | {"float64"} if x64_enabled() else CAPABILITIES

    def asarray(self, x: Any, /, dtype: str | None = None) -> jax.Array:
        if dtype is None:
            return jnp.asarray(x)
        if dtype not in _DTYPES:
            raise TypeError(f"asarray: the jax backend has no dtype {dtype!r} (it has {', '.join(_DTYPES)})")
        if not x64_enabled():
            if dtype == "float64":
                raise TypeError(
                    "asarray: float64 needs JAX's x64 mode (JAX would silently give float32); set "
                    "JAX_ENABLE_X64=1 before starting Python, or call "
                    "jax.config.update('jax_enable_x64', True)"
                )
            if dtype == "int64":
                dtype = "int32"  # what JAX does without x64; positions and lengths fit
        return jnp.asarray(x, dtype=_DTYPES[dtype])

    def native(self, x: Any, /) -> jax.Array:
        return x if isinstance(x, jax.Array) else jnp.asarray(x)  # a tracer is a jax.Array too

    def to_numpy(self, x: Any, /) -> np.ndarray:
        out = np.asarray(x)
        return out.astype(np.float32) if out.dtype == jnp.bfloat16 else out

    def dtype_name(self, x: Any, /) -> str:
        dtype = x.dtype if isinstance(x, jax.Array) else jnp.asarray(x).dtype
        return _NAMES.get(dtype) or str(dtype)  # str(dtype) costs microseconds on every op call

    def astype(self, x: Any, dtype: str, /) -> jax.Array:
        return x.astype(_DTYPES[dtype])

    def is_traced(self, x: Any, /) -> bool:
        return is_traced(x)

    # device: None (the base's). JAX itself refuses arrays committed to different devices, and a device
    # set would differ between an array and its sharded siblings that JAX combines without complaint.
