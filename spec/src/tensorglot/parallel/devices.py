"""Preparing a host before a launcher starts processes: its devices (a plugin hook, so the spec names
no backend), a free local port, stopping what was started, and a deadline for a step that cannot be
interrupted, all shared by every launcher."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..registry import registry

#: Start-ups a launcher tries, each on a fresh port, when the port it chose was taken in between.
PORT_ATTEMPTS = 3


def request_host_devices(backend: str, n: int, /) -> None:
    """Ask ``backend``'s plugin for ``n`` devices on this host before its framework starts.

    Calls the ``tensorglot_prepare_host_devices`` hook: JAX's plugin asks XLA for n CPU devices when JAX
    has not started yet; a backend that needs nothing (NumPy's simulated mesh, torch's processes) has no
    implementation, and then this does nothing.
    """
    registry().hook.tensorglot_prepare_host_devices(backend=backend, n=n)


def free_port() -> int:
    """A local TCP port that was free a moment ago (another process may take it before it is bound:
    see `port_taken`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(error: BaseException | str, /) -> bool:
    """Whether a start-up failed because its port was taken (EADDRINUSE), so that another port may work.

    >>> port_taken("DistNetworkError: ... code: -98, name: EADDRINUSE, message: address already in use")
    True
    """
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return True
    text = str(error)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def stop_processes(procs: Sequence[Any], *, grace: float) -> None:
    """Give ``procs`` (multiprocessing processes) ``grace`` seconds in all to exit, then kill what is
    left (a stopped process too) and reap it: nothing a launcher started outlives it."""
    end = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()  # SIGKILL: ends a process frozen by SIGSTOP as well
    for p in procs:
        p.join(timeout=5)


def abandon_queue(q: Any, /) -> None:
    """Let this process exit without flushing ``q`` (a multiprocessing queue): its feeder thread may be
    blocked writing to a process that is dead, and Python's exit would wait on it for ever."""
    q.cancel_join_thread()
    q.close()


_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorglot-step")


def with_deadline(what: str, timeout: float, run: Any, *args: Any) -> Any:
    """``run(*args)`` in a worker thread, or a TimeoutError "``what`` did not finish in ``timeout`` s".

    For a step that cannot be interrupted (one compiled XLA computation): past the deadline the caller
    gets the error, and the computation finishes in its thread (a later step waits for it).
    """
    future = _WORKER.submit(run, *args)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        raise TimeoutError(f"{what} did not finish in {timeout:g} s") from None
