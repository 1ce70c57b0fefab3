"""Starting the ranks of a torch parallel step: the spec's spawned `RankPool` on a free port, or torchrun's
environment.

`launch` keeps n spawned ranks between steps (`tensorglot.parallel.ranks`: start-up, a taken port's
retry, the first failure or the timeout killing them all); this module supplies how a rank joins the
process group (`_join`: gloo on CPU, NCCL when there are n GPUs). Under
torchrun (``torchrun --nproc-per-node N -m tensorglot_torch.parallel --strategy fsdp``, `main`) each of
its processes is one rank and runs the same `run_rank`. The ranks are ``spawn``ed: a script that calls
`step` needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import sys
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot import parallel as spec
from tensorglot.parallel import ranks

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


def _join(rank: int, n: int, port: int, timeout: float, *, threads: int) -> tuple[torch.device, Any]:
    """A spawned rank's start (`tensorglot.parallel.ranks.Join`): its threads, its device, the group."""
    torch.set_num_threads(threads)
    backend, device = _device(rank, n)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = timedelta(seconds=timeout)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n, timeout=wait)
    return device, dist.destroy_process_group


_POOLS: dict[int, ranks.RankPool] = {}  # by world size


def shutdown() -> None:
    """Stop the ranks kept for the next step (also at exit)."""
    ranks.close_all(_POOLS)
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
    join = functools.partial(_join, threads=max(1, torch.get_num_threads() // n))  # one process's threads
    return ranks.run_on(_POOLS, n, timeout, what, join, runner, args)


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
