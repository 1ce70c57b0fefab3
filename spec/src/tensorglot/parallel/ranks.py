"""Ranks kept between steps: n spawned processes that join a process group once, then run each program
they are sent, for any backend whose ranks are processes (torch's gloo and NCCL today).

Starting a framework n times costs seconds, so a launcher keeps a `RankPool` per world size. The
backend supplies only ``join(rank, n, port, timeout) -> (device, leave)``: join the process group on
``127.0.0.1:port`` (a picklable function: it runs in the spawned process), return what each program
gets as its last argument, and how to leave the group at the end. The pool owns the rest, the same
for every backend:

- every rank has joined when the pool is built; start-up has the step's timeout too;
- a port taken between choosing and binding it (`port_taken`) is retried on another, `PORT_ATTEMPTS`
  times;
- the first rank to fail, a dead rank or the timeout raises with the failing rank's traceback, and the
  caller kills the pool (`run_on`);
- no queue to a rank is flushed at exit, so a dead rank never keeps this process.

The ranks are ``spawn``ed: a script that calls a step needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import devices

#: ``join(rank, n, port, timeout) -> (device, leave)``, run in each spawned rank.
Join = Callable[[int, int, int, float], tuple[Any, Callable[[], None]]]


class _PortTaken(Exception):
    pass


def _serve(rank: int, n: int, port: int, tasks: Any, results: Any, join: Join, timeout: float) -> None:
    """A rank of the pool: joins the group once, then runs each ``(runner, args)`` it is sent until None."""
    try:
        try:
            device, leave = join(rank, n, port, timeout)
        except Exception as exc:
            if not devices.port_taken(exc):
                raise
            results.put(("port", rank, f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from None
        results.put(("ready", rank, None))
        while (task := tasks.get()) is not None:
            runner, args = task  # runner(*args, device): a step's rank, or another program of the ranks
            results.put(("ok", rank, runner(*args, device)))
        leave()
    except BaseException as exc:  # report every failure, then die: the parent kills the other ranks
        if not isinstance(exc, SystemExit):
            results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


class RankPool:
    """n spawned ranks on a free port, kept between steps; every rank has joined when it is built."""

    def __init__(self, n: int, timeout: float, what: str, join: Join) -> None:
        ctx = mp.get_context("spawn")
        for attempt in range(1, devices.PORT_ATTEMPTS + 1):
            self.n, self.results, self.tasks = n, ctx.Queue(), [ctx.Queue() for _ in range(n)]
            port = devices.free_port()
            self.procs = [
                ctx.Process(target=_serve, args=(r, n, port, self.tasks[r], self.results, join, timeout))
                for r in range(n)
            ]
            for p in self.procs:
                p.daemon = True
                p.start()
            try:
                self._gather("ready", what, timeout)
                return
            except _PortTaken as exc:
                self.close(kill=True)
                if attempt == devices.PORT_ATTEMPTS:
                    raise RuntimeError(f"parallel: {what}: {attempt} ports were taken ({exc})") from None
            except BaseException:
                self.close(kill=True)
                raise

    def _gather(self, kind: str, what: str, timeout: float) -> list[Any]:
        """Every rank's message of ``kind``; the first error, a dead rank or the timeout raises."""
        deadline, done = time.monotonic() + timeout, dict[int, Any]()
        while len(done) < self.n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"parallel: {what} on {self.n} ranks did not finish in {timeout:g} s")
            try:
                status, rank, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                if dead and self.results.empty():
                    code = self.procs[dead[0]].exitcode
                    raise RuntimeError(f"parallel: rank {dead[0]} of {self.n} died with exit code {code}") from None
                continue
            if status == "port":
                raise _PortTaken(payload)
            if status == "error":
                raise RuntimeError(f"parallel: rank {rank} of {self.n} failed: {payload}")
            if status == kind:
                done[rank] = payload
        return [done[r] for r in range(self.n)]

    def run(self, task: tuple[Any, ...], what: str, timeout: float) -> list[Any]:
        for q in self.tasks:
            q.put(task)
        return self._gather("ok", what, timeout)

    def close(self, *, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
        devices.stop_processes(self.procs, grace=0 if kill else 5)
        for q in [*self.tasks, self.results]:
            devices.abandon_queue(q)


def run_on(pools: dict[int, RankPool], n: int, timeout: float, what: str, join: Join, runner: Any, args: tuple) -> list:
    """``runner(*args, device)`` on the n ranks of ``pools[n]`` (started with ``join`` when missing), every
    rank's result in rank order; the first to fail, or the timeout, kills them all (the next call starts
    fresh ones). ``runner`` must be picklable."""
    if n not in pools:
        pools[n] = RankPool(n, timeout, f"{what} (starting the ranks)", join)
    try:
        return pools[n].run((runner, args), what, timeout)
    except BaseException:
        pools.pop(n).close(kill=True)
        raise


def close_all(pools: dict[int, RankPool]) -> None:
    """Stop every rank kept for a next step."""
    while pools:
        pools.popitem()[1].close()
