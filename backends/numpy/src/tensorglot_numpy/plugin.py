"""Registers the NumPy backend. Imports nothing heavy: the backend module loads on first use."""

from __future__ import annotations

from collections.abc import Callable

from tensorglot.backend import Backend
from tensorglot.hookspecs import hookimpl


def _load() -> Backend:
    from .backend import NumpyBackend

    return NumpyBackend()


@hookimpl
def tensorglot_register_backends(register: Callable[..., None]) -> None:
    from .backend import CAPABILITIES

    register("numpy", _load, capabilities=CAPABILITIES, framework="numpy")
