"""Registers the torch backend. Imports no torch: the backend module loads on first use."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from tensorglot.hookspecs import hookimpl

CAPABILITIES = frozenset(
    {"float64", "float16", "bfloat16", "grad", "layers", "dp", "tp", "fsdp", "pp", "serving", "flash"}
)


def _load():
    from .backend import TorchBackend

    return TorchBackend()


@hookimpl
def tensorglot_register_backends(register: Callable[..., None]) -> None:
    register("torch", _load, capabilities=CAPABILITIES, framework="torch")


@hookimpl
def tensorglot_register_bench_baselines(register: Callable[..., None]) -> None:
    register("torch", lambda: import_module(".bench", __package__).baselines())
