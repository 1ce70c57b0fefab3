"""A ``tensorglot serve --port`` subprocess on a free local port (``tensorglot bench serve --http``): started,
waited on until ``GET /health`` answers 200, then stopped with SIGTERM — the server drains and exits — and
killed only past a deadline, so nothing outlives the bench.

>>> with LocalServer(["--backend", "numpy", "--prefill-chunk", "64"]) as srv:  # doctest: +SKIP
...     loadgen.model_card(srv.url)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

#: one process, one thread: the same as the batch runs' ranks
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: a port taken between our probe and the server's bind: start again on another, at most this many times
PORT_ATTEMPTS = 3


class ServerError(RuntimeError):
    """The server exited during start-up, reported a failed start, or did not become healthy in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``python -m tensorglot.cli serve --port <free> *args`` with one thread per process; ``url`` once
    started, ``returncode`` once stopped (0: drained and exited by itself; None: never started)."""

    def __init__(self, args: list[str], *, host: str = "127.0.0.1", startup_s: float = 120.0, stop_s: float = 60.0):
        if not startup_s > 0 or not stop_s > 0:
            raise ValueError(f"LocalServer: startup_s and stop_s must be > 0, got {startup_s!r} and {stop_s!r}")
        self.args, self.host, self.startup_s, self.stop_s = list(args), host, startup_s, stop_s
        self.url = ""
        self.returncode: int | None = None
        self.killed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LocalServer:
        for attempt in range(PORT_ATTEMPTS):
            port = free_port(self.host)
            try:
                self._launch(port)
                return self
            except ServerError as exc:
                taken = "address already in use" in str(exc).lower()
                if not taken or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, port: int) -> None:
        import httpx

        self.url = f"http://{self.host}:{port}"
        cmd = [sys.executable, "-m", "tensorglot.cli", "serve", "--port", str(port), "--host", self.host, *self.args]
        # a file, not a pipe (a full pipe would block the server), kept open for log_tail after the exit
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd, env=os.environ | THREAD_ENV, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own group: a kill takes its workers too
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"LocalServer: {' '.join(cmd[2:])} exited with {self._proc.returncode} "
                                  f"during start-up: {self.log_tail()}")  # fmt: skip
            try:
                r = httpx.get(self.url + "/health", timeout=5)
            except httpx.TransportError:
                r = None
            if r is not None and r.status_code == 200:
                return
            if r is not None and r.status_code != 503:  # 500: a rank failed to start
                self.stop()
                raise ServerError(f"LocalServer: GET /health answered {r.status_code}: {r.text[:300]}")
            time.sleep(0.2)  # polls a server that is loading, no CPU to wait for
        self.stop()
        raise ServerError(f"LocalServer: {self.url} not healthy within {self.startup_s:g} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:].strip()

    def stop(self) -> int | None:
        """SIGTERM, wait ``stop_s`` for the drained exit, then SIGKILL (``killed``); the exit status."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        self.returncode = proc.returncode
        return self.returncode
