"""Registers the JAX backend. Imports no jax: the backend module loads on first use.

float64 is declared only when JAX itself computes in float64, i.e. when ``JAX_ENABLE_X64`` is set
(JAX reads the same variable when it starts). tensorglot never turns x64 on behind a user's back:
that flag changes the default dtype of every ``jnp.arange`` and Python float in the process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import import_module

from tensorglot.hookspecs import hookimpl

#: What the backend always provides; ``float64`` is added when x64 is on (see `x64_requested`).
CAPABILITIES = frozenset(
    {"jit", "grad", "float16", "bfloat16", "layers", "multi_device", "dp", "tp", "fsdp", "pp", "flash"}
)


def x64_requested() -> bool:
    """Whether ``JAX_ENABLE_X64`` asks for x64, parsed as JAX parses it."""
    return os.environ.get("JAX_ENABLE_X64", "").strip().lower() in ("1", "y", "yes", "t", "true", "on")


def _load():
    from .backend import JaxBackend

    return JaxBackend()


@hookimpl
def tensorglot_register_backends(register: Callable[..., None]) -> None:
    caps = CAPABILITIES | {"float64"} if x64_requested() else CAPABILITIES
    register("jax", _load, capabilities=caps, framework="jax")


@hookimpl
def tensorglot_prepare_host_devices(backend: str, n: int) -> None:
    """Ask XLA for ``n`` CPU devices if JAX has not started yet: it reads ``XLA_FLAGS`` once, when it
    initialises (GPUs and TPUs ignore the flag). A flag the user set is left alone."""
    flag = "--xla_force_host_platform_device_count"
    if backend == "jax" and "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={n}".strip()


@hookimpl
def tensorglot_register_bench_baselines(register: Callable[..., None]) -> None:
    register("jax", lambda: import_module(".bench", __package__).baselines())
