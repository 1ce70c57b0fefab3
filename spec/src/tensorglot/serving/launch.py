"""Starting the serving processes: each rank (or the colocated loop) is a fresh ``spawn``ed process with
the BLAS/OpenMP thread count set in its environment, joined by a transport on a free local port. Only
rank 0 (or the colocated process) talks to the launcher, through a multiprocessing queue: progress,
then the result or the error. The launcher has an overall deadline and kills any process left behind."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ..params import TransformerConfig
from . import transport as tr
from . import workers
from .admission import Request
from .model import Model

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Children started inside inherit ``threads`` BLAS/OpenMP threads: cross-process bit equality needs
    equal thread counts (torch sums in another order with 2 threads than with 1)."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, str(threads)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit(out: Any, code: int) -> None:
    out.close()
    out.join_thread()
    # Pending receives from a dead peer can keep a transport's shutdown waiting; the work is done.
    os._exit(code)


def _rank_main(rank: int, world: int, port: int, role: str, args: tuple, out: Any) -> None:
    opts: workers.Options = args[0]
    try:
        factory = tr.get_transport(opts.transport)
        t = factory(
            rank, world, address=f"tcp://127.0.0.1:{port}", timeout_s=opts.timeout_s, payload_spec=tr.payload_spec
        )
        if role == "router":
            workers.router(t, *args)
        elif role == "prefill":
            workers.prefill_worker(t, *args)
        else:
            workers.decode_worker(t, *args)
    except BaseException:
        out.put(("error", f"rank {rank} ({role}):\n{traceback.format_exc()}"))
        _exit(out, 1)
    _exit(out, 0)


def run_disaggregated(
    requests: list[Request],
    model: Model,
    config: TransformerConfig,
    opts: workers.Options,
    *,
    on_progress: Any = None,
    deadline_s: float = 600.0,
) -> dict[str, Any]:
    """Start router, prefill and decode ranks; return ``{"requests": [...], "events": [...], "wall_s"}``."""
    tr.get_transport(opts.transport)  # fail here, with the names installed, not in every rank
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    P = opts.prefill_workers
    world, decode, port = P + 2, P + 1, free_port()
    faults = {f.rank: f for f in opts.faults}
    roles: list[tuple[str, tuple]] = [("router", (opts, requests, config, out))]
    roles += [("prefill", (opts, model, faults.get(r))) for r in range(1, P + 1)]
    roles += [("decode", (opts, model))]
    with thread_env(opts.threads):
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, port, role, args, out), daemon=True)
            for r, (role, args) in enumerate(roles)
        ]
        for p in procs:
            p.start()
    result = None
    try:
        result = _collect(out, procs, [0, decode], on_progress, deadline_s)
    finally:
        _reap(procs, grace=5 if result is not None else 0.1)
    for event in result["events"]:
        workers.logger.warning(event)
    return result


def _process_main(fn: Callable[..., Any], requests: list[Request], model: Model, opts: Any, out: Any) -> None:
    try:
        result = fn(requests, model, opts, on_progress=lambda n: out.put(("progress", n)))
        out.put(("result", result))
    except BaseException:
        out.put(("error", f"the colocated process:\n{traceback.format_exc()}"))
    out.close()
    out.join_thread()


def run_in_process(
    fn: Callable[..., Any], requests: list[Request], model: Model, opts: Any, *, on_progress: Any, deadline_s: float
) -> dict[str, Any]:
    """``fn(requests, model, opts, on_progress=...)`` in a fresh spawned process (threads as set)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with thread_env(opts.threads):
        proc = ctx.Process(target=_process_main, args=(fn, requests, model, opts, out), daemon=True)
        proc.start()
    try:
        return _collect(out, [proc], [0], on_progress, deadline_s)
    finally:
        _reap([proc], grace=5)


def _reap(procs: list[Any], *, grace: float) -> None:
    for p in procs:
        p.join(timeout=grace)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _collect(out: Any, procs: list[Any], watch: list[int], on_progress: Any, deadline_s: float) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while True:
        if time.monotonic() > end:
            raise TimeoutError(f"serving did not finish within {deadline_s:.0f} s")
        try:
            kind, payload = out.get(timeout=0.5)
        except queue_mod.Empty:
            for r in watch:
                if procs[r].exitcode not in (None, 0):
                    raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode}") from None
            continue
        if kind == "progress" and on_progress is not None:
            on_progress(payload)
        elif kind == "error":
            raise RuntimeError(f"serving failed on {payload}")
        elif kind == "result":
            return payload
