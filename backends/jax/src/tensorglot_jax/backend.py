"""The JAX backend object: its namespaces are this package's modules, named as the spec's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import encodings, layers, ops, parallel
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


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


class JaxBackend:
    name = "jax"
    ops = ops
    encodings = encodings
    layers = layers
    parallel = parallel

    @property
    def capabilities(self) -> frozenset[str]:
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

    def to_numpy(self, x: Any, /) -> np.ndarray:
        out = np.asarray(x)
        return out.astype(np.float32) if out.dtype == jnp.bfloat16 else out

    def dtype_name(self, x: Any, /) -> str:
        return str(jnp.asarray(x).dtype)

    def __repr__(self) -> str:
        return "<tensorglot backend 'jax'>"
