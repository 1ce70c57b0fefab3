"""Starting the ranks of a torch parallel step: our own spawn on a free port, or torchrun's environment.

`launch` keeps n spawned ranks between steps (starting torch n times costs seconds); the first rank to
fail, or the step's timeout, kills them all and raises with the failing rank's traceback. Start-up has
the step's timeout too, and a port taken between choosing and binding it is retried on another
(`PORT_ATTEMPTS`). No queue to a rank is flushed at exit, so a dead rank never keeps this process. Under
torchrun (``torchrun --nproc-per-node N -m tensorglot_torch.parallel --strategy fsdp``, `main`) each of
its processes is one rank and runs the same `run_rank`. The ranks are ``spawn``ed: a script that calls
`step` needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot import parallel as spec
from tensorglot.parallel.devices import PORT_ATTEMPTS, abandon_queue, free_port, port_taken, stop_processes

from ._common import DTYPES
from .collectives import FAIL_RANK_ENV, ProcessGroupCollectives, host


def _device(rank: int, n: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available() and torch.cuda.device_count() >= n:
        return "nccl", torch.device("cuda", rank)
    return "gloo", torch.device("cpu")


def run_rank(config: spec.StepConfig, arrays: dict[str, np.ndarray], fail: str | None, device: torch.device):
    """This rank's part of the step, timed between barriers: its host pieces, its log and the seconds."""
    rank, n = dist.get_rank(), dist.get_world_size()
    ts = {k: torch.from_numpy(v).to(device=device, dtype=DTYPES[config.dtype]) for k, v in arrays.items()}
    x, dy = ts.pop("x"), ts.pop("dy")
    comm = ProcessGroupCollectives(rank, n, fail=fail)
    dist.barrier()
    start = time.perf_counter()
    pieces = spec.rank_step(comm, ts, x, dy, config)
    comm.wait_sends()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return pieces.map(host), comm.log, time.perf_counter() - start


def _serve(rank: int, n: int, port: int, tasks: Any, results: Any, threads: int, timeout: float) -> None:
    """A rank of the pool: joins the process group once, then runs each step it is sent until told to stop."""
    try:
        torch.set_num_threads(threads)
        backend, device = _device(rank, n)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        wait = timedelta(seconds=timeout)
        try:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n, timeout=wait
            )
        except Exception as exc:
            if not port_taken(exc):
                raise
            results.put(("port", rank, f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from None
        results.put(("ready", rank, None))
        while (task := tasks.get()) is not None:
            runner, args = task  # runner(*args, device): `run_rank`, or another program of the ranks
            results.put(("ok", rank, runner(*args, device)))
        dist.destroy_process_group()
    except BaseException as exc:  # report every failure, then die: the parent kills the other ranks
        if not isinstance(exc, SystemExit):
            results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


class _PortTaken(Exception):
    pass


class _Pool:
    """n spawned ranks on a free port, kept between steps; every rank has joined when it is built."""

    def __init__(self, n: int, timeout: float, what: str) -> None:
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // n)  # the same thread budget as one process
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.n, self.results, self.tasks = n, ctx.Queue(), [ctx.Queue() for _ in range(n)]
            port = free_port()
            self.procs = [
                ctx.Process(target=_serve, args=(r, n, port, self.tasks[r], self.results, threads, timeout))
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
                if attempt == PORT_ATTEMPTS:
                    raise RuntimeError(f"parallel: {what}: {PORT_ATTEMPTS} ports were taken ({exc})") from None
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
        stop_processes(self.procs, grace=0 if kill else 5)
        for q in [*self.tasks, self.results]:
            abandon_queue(q)


_POOLS: dict[int, _Pool] = {}  # by world size


def shutdown() -> None:
    """Stop the ranks kept for the next step (also at exit)."""
    while _POOLS:
        _POOLS.popitem()[1].close()
    if dist.is_initialized():  # this process is a rank under torchrun
        dist.destroy_process_group()


atexit.register(shutdown)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _torchrun_rank(world_size: int, timeout: float, runner: Any, args: tuple[Any, ...]) -> list[Any]:
    """Under torchrun this process is one rank: its part of the step, then every rank's (outside the step).

    A rank that stops answering is caught by the process group's timeout, and torchrun stops the others.
    """
    n = int(os.environ["WORLD_SIZE"])
    if world_size != n:
        raise ValueError(f"step: world_size = {world_size}, but torchrun started {n} ranks")
    backend, device = _device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), n)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    ranks: list[Any] = [None] * n
    dist.all_gather_object(ranks, runner(*args, device))
    return ranks


def run_ranks(n: int, timeout: float, what: str, runner: Any, args: tuple[Any, ...]) -> list[Any]:
    """``runner(*args, device)`` on n ranks (kept spawned ones, or torchrun's), every rank's result in
    rank order; the first to fail, or the timeout, kills them all. ``runner`` must be picklable."""
    if _under_torchrun():
        return _torchrun_rank(n, timeout, runner, args)
    if n not in _POOLS:
        _POOLS[n] = _Pool(n, timeout, f"{what} (starting the ranks)")
    try:
        return _POOLS[n].run((runner, args), what, timeout)
    except BaseException:
        _POOLS.pop(n).close(kill=True)
        raise


def launch(config: spec.StepConfig, arrays: dict[str, np.ndarray]) -> spec.StepResult:
    """Run one step on ``config.world_size`` ranks; the first to fail, or the timeout, kills them all."""
    args = (config, arrays, os.environ.get(FAIL_RANK_ENV))
    ranks = run_ranks(config.world_size, config.timeout, config.strategy, run_rank, args)
    pieces, logs, seconds = zip(*ranks)
    return spec.gather_result(config, pieces, logs, max(seconds))


def main(argv: list[str] | None = None) -> int:
    """``python -m tensorglot_torch.parallel [options of tensorglot parallel]``: that command on torch.

    Under ``torchrun --nproc-per-node N`` every process is one rank of each step (rank 0 prints);
    otherwise the command spawns its ranks.
    """
    from tensorglot.cli import main as cli

    args = ["parallel", "--backend", "torch", *(sys.argv[1:] if argv is None else argv)]
    if not _under_torchrun():
        return cli(args)
    args += ["--world-size", os.environ["WORLD_SIZE"]]
    if os.environ["RANK"] == "0":
        return cli(args)
    with contextlib.redirect_stdout(io.StringIO()):
        return cli(args)
