"""The pluggy hooks a tensorglot plugin may implement.

A plugin is a module named by an entry point in the ``tensorglot`` group. The entry point's name is
the backend it provides (``numpy = "tensorglot_numpy.plugin"``); a plugin that adds no backend, only
commands, uses a dotted name (``cli.plots``) so that `available_backends` can skip it without an import.
The host passes a ``register`` callback, so it owns naming and duplicate detection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("tensorglot")
hookimpl = pluggy.HookimplMarker("tensorglot")


@hookspec
def tensorglot_register_backends(register: Callable[..., None]) -> None:
    """Call ``register(name, loader, *, capabilities, framework=None)`` once per backend provided."""


@hookspec
def tensorglot_register_commands(register: Callable[..., Any]) -> None:
    """Call ``register(name, help, configure, run)`` to add a subcommand to the ``tensorglot`` CLI."""


@hookspec
def tensorglot_prepare_host_devices(backend: str, n: int) -> None:
    """Before ``backend``'s framework starts, ask for ``n`` devices on this host (JAX: n CPU devices)."""


@hookspec
def tensorglot_register_transports(register: Callable[..., Any]) -> None:
    """Call ``register(name, factory)`` once per serving transport: ``factory(rank, world_size, **options)``
    returns a `tensorglot.serving.transport.Transport` and imports its framework only when called."""


@hookspec
def tensorglot_register_bench_baselines(register: Callable[..., None]) -> None:
    """Call ``register(backend, loader)``; ``loader()`` returns the backend's bench baselines and probes
    (a dict keyed by row name; see `tensorglot.bench`). It runs only when that backend is benchmarked."""
