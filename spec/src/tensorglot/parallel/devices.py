"""Preparing a host's devices before a backend's framework starts: a plugin hook, so the spec names none."""

from __future__ import annotations

from ..registry import registry


def request_host_devices(backend: str, n: int, /) -> None:
    """Ask ``backend``'s plugin for ``n`` devices on this host before its framework starts.

    Calls the ``tensorglot_prepare_host_devices`` hook: JAX's plugin asks XLA for n CPU devices when JAX
    has not started yet; a backend that needs nothing (NumPy's simulated mesh, torch's processes) has no
    implementation, and then this does nothing.
    """
    registry().hook.tensorglot_prepare_host_devices(backend=backend, n=n)
