"""Waiting for a server started as subprocesses to answer ``GET /health`` with 200."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_healthy(url: str, exited: Callable[[], str | None], within_s: float) -> None:
    """Poll ``url``/health until it answers 200; fail with ``exited()`` when that names a process that
    ended, or after ``within_s`` seconds."""
    import httpx

    deadline = time.monotonic() + within_s
    while True:
        gone = exited()
        assert gone is None, gone
        assert time.monotonic() < deadline, f"the server did not become healthy within {within_s:g} s"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
