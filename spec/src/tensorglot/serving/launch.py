"""Starting the serving processes: each rank (or the colocated loop) is a fresh ``spawn``ed process with
the BLAS/OpenMP thread count set in its environment, joined by a transport on a free local port (a
port taken in between is retried on another, `PORT_ATTEMPTS` times). Only rank 0 (or the colocated
process) talks to the launcher, through a multiprocessing queue: "started" once every worker is ready,
progress, then the result or the error. Until "started" any rank's death fails the run; after it only
the router's does (the router handles its workers' faults). The launcher has an overall deadline and
kills any process left behind, a frozen one included."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from ..parallel.devices import PORT_ATTEMPTS, abandon_queue, free_port, port_taken, stop_processes
from ..params import TransformerConfig
from . import router, workers
from . import transport as tr
from .admission import Request
from .model import Model

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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


def _exit(out: Any, code: int) -> NoReturn:
    out.close()
    out.join_thread()
    # Pending receives from a dead peer can keep a transport's shutdown waiting; the work is done.
    os._exit(code)


def _rank_main(rank: int, world: int, port: int, role: str, args: tuple, out: Any) -> None:
    opts: workers.Options = args[0]
    try:
        factory = tr.get_transport(opts.transport)
        address = f"tcp://127.0.0.1:{port}"
        try:
            t = factory(rank, world, address=address, timeout_s=opts.timeout_s, payload_spec=tr.payload_spec)
        except Exception as exc:
            if not port_taken(exc):
                raise
            out.put(("port", f"rank {rank} ({role}): {type(exc).__name__}: {exc}"))
            _exit(out, 1)
        if role == "router":
            router.router(t, *args)
        elif role == "prefill":
            workers.prefill_worker(t, *args)
        else:
            workers.decode_worker(t, *args)
    except BaseException:
        out.put(("error", f"rank {rank} ({role}):\n{traceback.format_exc()}"))
        _exit(out, 1)
    _exit(out, 0)


class _PortTaken(Exception):
    pass


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
    end = time.monotonic() + deadline_s
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            result = _start_and_collect(requests, model, config, opts, on_progress, end - time.monotonic())
            break
        except _PortTaken as exc:
            if attempt == PORT_ATTEMPTS:
                raise RuntimeError(f"serve: {PORT_ATTEMPTS} ports were taken: {exc}") from None
    for event in result["events"]:
        workers.logger.warning(event)
    return result


def _start_and_collect(
    requests: list[Request], model: Model, config: TransformerConfig, opts: workers.Options, on_progress: Any,
    deadline_s: float,
) -> dict[str, Any]:  # fmt: skip
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    P, M = opts.prefill_workers, opts.decode_workers
    world, port = P + M + 1, free_port()
    faults = {f.rank: f for f in opts.faults}
    roles: list[tuple[str, tuple]] = [("router", (opts, requests, config, out))]
    roles += [("prefill", (opts, model, faults.get(r))) for r in range(1, P + 1)]
    roles += [("decode", (opts, model, faults.get(r))) for r in range(P + 1, P + M + 1)]
    with thread_env(opts.threads):
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, port, role, args, out), daemon=True)
            for r, (role, args) in enumerate(roles)
        ]
        for p in procs:
            p.start()
    result = None
    try:
        result = _collect(out, procs, on_progress, deadline_s, roles=[role for role, _ in roles])
    finally:
        stop_processes(procs, grace=2 if result is not None else 0)  # the result is in: nothing to lose
        abandon_queue(out)
    return result


def start_workers(model: Model, opts: workers.Options) -> tuple[list[Any], int, Any]:
    """Spawn the worker ranks 1..P + M of a server on a free port, whose rank 0 (the router) the caller
    joins itself; returns the processes, the port and the queue their errors come on (keep it alive
    until they have started: they unpickle it)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    P, M = opts.prefill_workers, opts.decode_workers
    world, port = P + M + 1, free_port()
    faults = {f.rank: f for f in opts.faults}
    roles = [("prefill" if r <= P else "decode", (opts, model, faults.get(r))) for r in range(1, world)]
    with thread_env(opts.threads):
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, port, role, args, out), daemon=True)
            for r, (role, args) in enumerate(roles, start=1)
        ]
        for p in procs:
            p.start()
    return procs, port, out


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
    result = None
    try:
        result = _collect(out, [proc], on_progress, deadline_s, roles=["the colocated process"], started=True)
    finally:
        stop_processes([proc], grace=5 if result is not None else 0)
        abandon_queue(out)
    return result


def _collect(
    out: Any, procs: list[Any], on_progress: Any, deadline_s: float, *, roles: list[str], started: bool = False
) -> dict[str, Any]:
    """Progress, then the result of rank 0. Before "started" any rank's exit fails the run (its peers
    wait for it in the transport's start-up); after it only rank 0's, which handles its workers'."""
    end = time.monotonic() + deadline_s
    while True:
        if time.monotonic() > end:
            raise TimeoutError(f"serve: serving did not finish within the deadline of {deadline_s:.0f} s")
        try:
            kind, payload = out.get(timeout=0.2)
        except queue_mod.Empty:
            for r in range(len(procs) if not started else 1):
                code = procs[r].exitcode
                if code is not None and (code != 0 or not started):
                    when = "" if started else " during start-up"
                    raise RuntimeError(f"serve: rank {r} ({roles[r]}) exited{when} with code {code}") from None
            continue
        if kind == "progress" and on_progress is not None:
            on_progress(payload)
        elif kind == "started":
            started = True
        elif kind == "port":
            raise _PortTaken(payload)
        elif kind == "error":
            raise RuntimeError(f"serve: serving failed on {payload}")
        elif kind == "result":
            return payload
