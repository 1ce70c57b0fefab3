"""Registers the torch backend, the ``torch.distributed`` serving transport and the ``tensorglot serve``
command that uses it. Imports no torch: the backend and the transport load on first use."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from tensorglot.hookspecs import hookimpl

CAPABILITIES = frozenset({"float64", "float16", "bfloat16", "grad", "layers", "dp", "tp", "fsdp", "pp", "flash"})


def _load():
    from .backend import TorchBackend

    return TorchBackend()


def _transport(rank: int, world_size: int, **options: Any) -> Any:
    from .serving.transport import TorchTransport

    return TorchTransport(rank, world_size, **options)


@hookimpl
def tensorglot_register_backends(register: Callable[..., None]) -> None:
    register("torch", _load, capabilities=CAPABILITIES, framework="torch")


@hookimpl
def tensorglot_register_bench_baselines(register: Callable[..., None]) -> None:
    register("torch", lambda: import_module(".bench", __package__).baselines())


@hookimpl
def tensorglot_register_transports(register: Callable[..., Any]) -> None:
    register("torch", _transport)


@hookimpl
def tensorglot_register_commands(register: Callable[..., Any]) -> None:
    from tensorglot.serving import cli

    register("serve", cli.HELP, cli.configure, cli.run)
