"""Registers the xp backend. Imports no array library: the namespace loads on first use.

``TENSORGLOT_XP_NAMESPACE`` names the array namespace (default ``array_api_strict``, the standard and
nothing more; ``numpy`` runs through ``array_api_compat.numpy``). It is read here, to declare the
capabilities, and again when the backend loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tensorglot.hookspecs import hookimpl

DEFAULT_NAMESPACE = "array_api_strict"
#: What every namespace gives the backend. float16 is not in the standard: it is declared only for the
#: namespaces known to carry it, and the loaded backend checks the namespace itself (``hasattr``).
CAPABILITIES = frozenset({"float64", "flash", "layers"})
FLOAT16_NAMESPACES = frozenset({"numpy", "cupy", "torch", "jax.numpy", "dask.array"})


def namespace_name() -> str:
    return os.environ.get("TENSORGLOT_XP_NAMESPACE", "").strip() or DEFAULT_NAMESPACE


def declared_capabilities(namespace: str) -> frozenset[str]:
    return CAPABILITIES | {"float16"} if namespace in FLOAT16_NAMESPACES else CAPABILITIES


def _load():
    from .backend import XpBackend

    return XpBackend()


@hookimpl
def tensorglot_register_backends(register: Callable[..., None]) -> None:
    namespace = namespace_name()
    # The distribution whose version the listing shows: array_api_strict → array-api-strict, jax.numpy → jax.
    framework = namespace.split(".")[0].replace("_", "-")
    register("xp", _load, capabilities=declared_capabilities(namespace), framework=framework)
