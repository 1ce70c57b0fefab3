"""torch parallel strategies over torch.distributed: see the spec (`tensorglot.parallel`).

Real processes, one per rank: gloo on CPU, NCCL when every rank has its own GPU. `step` starts them
itself on a free port (``spawn``) and kills them all when one fails or the timeout passes; the same
rank code runs unchanged under ``torchrun --nproc-per-node N -m tensorglot_torch.parallel --strategy fsdp``.
Each collective is logged from its tensor (logical bytes; gloo's own traffic differs).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot import parallel as spec
from tensorglot.parallel import Collective, StepResult

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Fault injection for the tests, in tp and dp_tp backward (the other ranks wait in an all-reduce):
# "R" makes rank R raise, "R:hang" makes it stop answering.
FAIL_RANK_ENV = "TENSORGLOT_PARALLEL_FAIL_RANK"


class _Comm:
    """Explicit collectives on ``dtype`` tensors (the step's dtype), logging what each one moves."""

    def __init__(self, rank: int, n: int, dtype: torch.dtype, compute: torch.dtype) -> None:
        self.rank, self.n, self.dtype, self.compute = rank, n, dtype, compute
        self.log: list[Collective] = []
        self.pending: list[Any] = []

    def all_reduce(self, t: torch.Tensor, tensor: str, group: Any = None, size: int | None = None) -> torch.Tensor:
        buf = t.to(self.dtype).contiguous()
        dist.all_reduce(buf, group=group)
        self.log.append(Collective("all_reduce", tensor, buf.nbytes, size or self.n))
        return buf.to(self.compute)

    def all_gather(self, shard: torch.Tensor, tensor: str) -> torch.Tensor:
        out = shard.new_empty((self.n * shard.shape[0], *shard.shape[1:]))
        dist.all_gather_single(out, shard.contiguous())
        self.log.append(Collective("all_gather", tensor, out.nbytes, self.n))
        return out.to(self.compute)

    def reduce_scatter(self, t: torch.Tensor, tensor: str) -> torch.Tensor:
        full = t.to(self.dtype).contiguous()
        out = full.new_empty((full.shape[0] // self.n, *full.shape[1:]))
        dist.reduce_scatter_single(out, full)
        self.log.append(Collective("reduce_scatter", tensor, full.nbytes, self.n))
        return out

    def send(self, t: torch.Tensor, dst: int, tensor: str) -> None:
        buf = t.to(self.dtype).contiguous()
        # isend so that two neighbours that both send first cannot deadlock; waited at the step's end
        self.pending += dist.batch_isend_irecv([dist.P2POp(dist.isend, buf, dst)])
        self.log.append(Collective("send", tensor, buf.nbytes, 2))

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        buf = torch.empty(like.shape, dtype=self.dtype, device=like.device)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, src)]):
            work.wait()
        return buf.to(self.compute)

    def finish(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()


# The layer, forward and backward, in the compute dtype; the output is rounded to the step's dtype.


def _layer_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, dtype: torch.dtype):
    pre = x @ w_in  # (B, F)
    h = torch.relu(pre)
    return (h @ w_out).to(dtype).to(x.dtype), (x, pre, h)


def _layer_backward(saved, w_in, w_out, dy, dtype):
    x, pre, h = saved
    dw_out = h.T @ dy  # (F, D)
    dh = (dy @ w_out.T) * (pre > 0)  # (B, F)
    return (dh @ w_in.T).to(dtype).to(x.dtype), x.T @ dh, dw_out


def _names(l: int) -> tuple[str, str]:
    return f"layers.{l}.w_in", f"layers.{l}.w_out"


def _sgd(w: torch.Tensor, g: torch.Tensor, lr: float, dtype: torch.dtype) -> torch.Tensor:
    return (w.to(g.dtype) - lr * g).to(dtype)


def _forward_all(h: torch.Tensor, ws: list[tuple[torch.Tensor, torch.Tensor]], dt: torch.dtype):
    saved = []
    for wi, wo in ws:
        h, s = _layer_forward(h, wi, wo, dt)
        saved.append(s)
    return h, saved


_GROUPS: dict[tuple[int, int], tuple[Any, Any]] = {}


def _mesh_groups(rank: int, n: int, t: int) -> tuple[Any, Any]:
    """This rank's (tp row, dp column) groups of the (n/t, t) mesh; every rank creates every group, in order."""
    if (n, t) not in _GROUPS:
        d, rows, cols = n // t, [], []
        for a in range(d):
            rows.append(dist.new_group([a * t + c for c in range(t)]))
        for c in range(t):
            cols.append(dist.new_group([a * t + c for a in range(d)]))
        _GROUPS[n, t] = (rows[rank // t], cols[rank % t])
    return _GROUPS[n, t]


def _rank_step(rank: int, n: int, cfg: dict[str, Any], arrays: dict[str, np.ndarray], device: torch.device):
    """One rank's part of the step. Returns its pieces (output, input grad, grads, params) and its comm."""
    dt = _DTYPES[cfg["dtype"]]
    ct = torch.float64 if dt == torch.float64 else torch.float32
    comm = _Comm(rank, n, dt, ct)
    full = {k: torch.from_numpy(v).to(device).to(dt).to(ct) for k, v in arrays.items()}
    x, dy = full.pop("x"), full.pop("dy")
    L, lr, strategy = len(full) // 2, cfg["lr"], cfg["strategy"]
    fail = cfg.get("fail_rank")
    pieces: dict[str, Any] = {"grads": {}, "params": {}}
    if strategy in ("dp", "fsdp"):
        x, dy = x.chunk(n)[rank], dy.chunk(n)[rank]  # (B/n, D)
    if strategy == "dp":
        h, saved = _forward_all(x, [(full[a], full[b]) for a, b in map(_names, range(L))], dt)
        g = dy
        for l in reversed(range(L)):
            ki, ko = _names(l)
            g, gi, go = _layer_backward(saved[l], full[ki], full[ko], g, dt)
            pieces["grads"][ko] = comm.all_reduce(go, f"{ko} grad")
            pieces["grads"][ki] = comm.all_reduce(gi, f"{ki} grad")
        pieces["params"] = {k: _sgd(full[k], pieces["grads"][k], lr, dt) for k in full}
        param_bytes = sum(v.to(dt).nbytes for v in full.values())
    elif strategy in ("tp", "dp_tp"):
        t = n if strategy == "tp" else cfg["tp_size"]
        d, row, col = n // t, rank // t, rank % t
        tp_group = dp_group = None
        if strategy == "dp_tp":
            tp_group, dp_group = _mesh_groups(rank, n, t)
            x, dy = x.chunk(d)[row], dy.chunk(d)[row]  # (B/d, D)
        # this rank holds columns `col` of w_in (D, F/t) and rows `col` of w_out (F/t, D)
        ws = [(full[a].chunk(t, 1)[col], full[b].chunk(t, 0)[col]) for a, b in map(_names, range(L))]
        h, saved = x, []
        for l, (wi, wo) in enumerate(ws):
            part, s = _layer_forward(h, wi, wo, dt)
            saved.append(s)
            h = comm.all_reduce(part, f"layers.{l} output", tp_group, t)
        g, gs = dy, {}
        for l in reversed(range(L)):
            if fail is not None and fail[0] == rank:
                if fail[1] == "hang":
                    time.sleep(3600)
                raise RuntimeError(f"injected failure on rank {rank} ({FAIL_RANK_ENV})")
            part, gs[_names(l)[0]], gs[_names(l)[1]] = _layer_backward(saved[l], *ws[l], g, dt)
            g = comm.all_reduce(part, f"layers.{l} input grad", tp_group, t)
        if strategy == "dp_tp":
            for l in reversed(range(L)):
                ki, ko = _names(l)
                gs[ko] = comm.all_reduce(gs[ko], f"layers.{l}.w_out grad shard", dp_group, d)
                gs[ki] = comm.all_reduce(gs[ki], f"layers.{l}.w_in grad shard", dp_group, d)
        for l, (wi, wo) in enumerate(ws):
            ki, ko = _names(l)
            pieces["params"][ki], pieces["params"][ko] = _sgd(wi, gs[ki], lr, dt), _sgd(wo, gs[ko], lr, dt)
        pieces["grads"] = gs
        param_bytes = sum(wi.to(dt).nbytes + wo.to(dt).nbytes for wi, wo in ws)
    elif strategy == "fsdp":
        shard = {k: v.chunk(n, 0)[rank].to(dt).clone() for k, v in full.items()}  # all this rank keeps
        del full
        h, saved = x, []
        for l in range(L):
            ki, ko = _names(l)
            wi, wo = comm.all_gather(shard[ki], ki), comm.all_gather(shard[ko], ko)
            h, s = _layer_forward(h, wi, wo, dt)
            saved.append(s)
            del wi, wo  # freed after use: gathered again for backward
        g = dy
        for l in reversed(range(L)):
            ki, ko = _names(l)
            xs, pre, hs = saved[l]
            wo = comm.all_gather(shard[ko], ko)
            pieces["grads"][ko] = comm.reduce_scatter(hs.T @ g, f"{ko} grad")
            dh = (g @ wo.T) * (pre > 0)  # (B/n, F)
            wi = comm.all_gather(shard[ki], ki)
            pieces["grads"][ki] = comm.reduce_scatter(xs.T @ dh, f"{ki} grad")
            g = (dh @ wi.T).to(dt).to(ct)
        pieces["params"] = {k: _sgd(shard[k], pieces["grads"][k].to(ct), lr, dt) for k in shard}
        param_bytes = sum(v.nbytes for v in shard.values())
    else:  # pp
        m, per = cfg["microbatches"], L // n
        mine = range(rank * per, (rank + 1) * per)
        xs, dys = x.chunk(m), dy.chunk(m)  # (B/m, D) microbatches
        gs = {k: torch.zeros_like(full[k]) for l in mine for k in _names(l)}
        stash: dict[int, list[Any]] = {}
        outs: dict[int, torch.Tensor] = {}
        for _, i, op, j in spec.pipeline_schedule(cfg["schedule"], n, m):
            if i != rank:
                continue
            if op == "F":
                h = xs[j] if i == 0 else comm.recv(xs[j], i - 1)
                h, stash[j] = _forward_all(h, [(full[a], full[b]) for a, b in map(_names, mine)], dt)
                if i < n - 1:
                    comm.send(h, i + 1, f"microbatch {j} activation")
                else:
                    outs[j] = h
            else:
                g = dys[j] if i == n - 1 else comm.recv(dys[j], i + 1)
                for l, s in zip(reversed(mine), reversed(stash.pop(j))):
                    ki, ko = _names(l)
                    g, gi, go = _layer_backward(s, full[ki], full[ko], g, dt)
                    gs[ki] += gi
                    gs[ko] += go
                if i > 0:
                    comm.send(g, i - 1, f"microbatch {j} grad")
                else:
                    outs[j] = g
        comm.finish()
        if rank == n - 1:
            h = torch.cat([outs[j] for j in range(m)])
        if rank == 0:
            g = torch.cat([outs[j] for j in range(m)])
        pieces["grads"] = {k: v.to(dt) for k, v in gs.items()}
        pieces["params"] = {k: _sgd(full[k], gs[k], lr, dt) for k in gs}
        param_bytes = sum(full[k].to(dt).nbytes for k in gs)
    comm.finish()
    if strategy != "pp" or rank == n - 1:
        pieces["output"] = h.to(dt)
    if strategy != "pp" or rank == 0:
        pieces["input_grad"] = g.to(dt)
    return pieces, comm, param_bytes


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _run_rank(rank: int, n: int, cfg: dict[str, Any], arrays: dict[str, np.ndarray], device: torch.device):
    """The step ``repeats`` times (each from the same start), timed between barriers; the last one's pieces."""
    times = []
    for _ in range(cfg.get("repeats", 1)):
        dist.barrier()
        start = time.perf_counter()
        pieces, comm, param_bytes = _rank_step(rank, n, cfg, arrays, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        times.append(time.perf_counter() - start)
    host = {
        "output": _to_numpy(pieces["output"]) if "output" in pieces else None,
        "input_grad": _to_numpy(pieces["input_grad"]) if "input_grad" in pieces else None,
        "grads": {k: _to_numpy(v) for k, v in pieces["grads"].items()},
        "params": {k: _to_numpy(v) for k, v in pieces["params"].items()},
    }
    return {
        "rank": rank,
        "pieces": host,
        "log": comm.log,
        "param_bytes": param_bytes,
        "seconds": statistics.median(times),
    }


def _assemble(strategy: str, n: int, t: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Host-side: the ranks' pieces as full arrays (not part of the step, not counted)."""
    p = [r["pieces"] for r in ranks]
    cat = np.concatenate
    if strategy in ("dp", "fsdp"):
        y, dx = cat([q["output"] for q in p]), cat([q["input_grad"] for q in p])
    elif strategy == "pp":
        y, dx = p[-1]["output"], p[0]["input_grad"]
    else:
        rows = range(0, n, t)
        y, dx = cat([p[r]["output"] for r in rows]), cat([p[r]["input_grad"] for r in rows])
    out: dict[str, Any] = {"output": y, "input_grad": dx}
    for what in ("grads", "params"):
        if strategy == "dp":
            out[what] = p[0][what]
        elif strategy == "fsdp":
            out[what] = {k: cat([q[what][k] for q in p]) for k in p[0][what]}
        elif strategy == "pp":
            out[what] = {k: v for q in p for k, v in q[what].items()}
        else:  # tp, dp_tp: the first row's column shards
            out[what] = {
                k: cat([p[c][what][k] for c in range(t)], axis=1 if k.endswith("w_in") else 0) for k in p[0][what]
            }
    return out


# Launching: our own spawn on a free port, or torchrun's environment.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device(rank: int, n: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available() and torch.cuda.device_count() >= n:
        return "nccl", torch.device("cuda", rank)
    return "gloo", torch.device("cpu")


def _serve(rank: int, n: int, port: int, tasks: Any, results: Any, threads: int, timeout: float) -> None:
    """A rank of the pool: joins the process group once, then runs each step it is sent until told to stop."""
    try:
        torch.set_num_threads(threads)
        backend, device = _device(rank, n)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n, timeout=timedelta(seconds=timeout)
        )
        while (task := tasks.get()) is not None:
            cfg, arrays = task
            results.put(("ok", rank, _run_rank(rank, n, cfg, arrays, device)))
        dist.destroy_process_group()
    except BaseException as exc:  # report every failure, then die: the parent kills the other ranks
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


class _Pool:
    """n spawned ranks on a free port, kept between steps (starting torch n times costs seconds)."""

    def __init__(self, n: int, timeout: float) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.n = n
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(n)]
        threads = max(1, torch.get_num_threads() // n)  # the same thread budget as one process
        port = _free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, n, port, self.tasks[r], self.results, threads, timeout), daemon=True)
            for r in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(self, cfg: dict[str, Any], arrays: dict[str, np.ndarray], timeout: float) -> list[dict[str, Any]]:
        for q in self.tasks:
            q.put((cfg, arrays))
        deadline = time.monotonic() + timeout
        done: dict[int, dict[str, Any]] = {}
        while len(done) < self.n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"parallel: {cfg['strategy']} on {self.n} ranks did not finish in {timeout:g} s")
            try:
                status, rank, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                if dead and self.results.empty():
                    code = self.procs[dead[0]].exitcode
                    raise RuntimeError(f"parallel: rank {dead[0]} of {self.n} died with exit code {code}") from None
                continue
            if status == "error":
                raise RuntimeError(f"parallel: rank {rank} of {self.n} failed: {payload}")
            done[rank] = payload
        return [done[r] for r in range(self.n)]

    def close(self, *, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


_POOLS: dict[int, _Pool] = {}  # by world size


def shutdown() -> None:
    """Stop the ranks kept for the next step (also at exit)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


atexit.register(shutdown)


def launch(n: int, cfg: dict[str, Any], arrays: dict[str, np.ndarray], *, timeout: float) -> list[dict[str, Any]]:
    """Run one step on n ranks; the first rank to fail, or the timeout, kills them all and raises."""
    if n not in _POOLS:
        _POOLS[n] = _Pool(n, timeout)
    fail = os.environ.get(FAIL_RANK_ENV)
    rank, _, mode = (fail or "").partition(":")
    cfg = {**cfg, "fail_rank": (int(rank), mode) if fail else None}
    try:
        return _POOLS[n].run(cfg, arrays, timeout)
    except BaseException:
        _POOLS.pop(n).close(kill=True)
        raise


def _prepare(fn: str, params: Mapping[str, Any], x: Any, dy: Any) -> tuple[dict[str, np.ndarray], str]:
    def host(name: str, a: Any) -> tuple[np.ndarray, str]:
        if isinstance(a, torch.Tensor):
            if not a.is_floating_point():
                raise TypeError(f"{fn}: {name} has dtype {a.dtype}, wanted a floating dtype")
            return _to_numpy(a), str(a.dtype).removeprefix("torch.")
        arr = np.asarray(a)
        if arr.dtype.kind != "f":
            raise TypeError(f"{fn}: {name} has dtype {arr.dtype}, wanted a floating dtype")
        return arr, str(arr.dtype)

    arrays, dtypes = {}, {}
    for name, value in [*params.items(), ("x", x), ("dy", dy)]:
        arrays[name], dtypes[name] = host(name, value)
    if dtypes["x"] not in _DTYPES:
        raise TypeError(f"{fn}: x has dtype {dtypes['x']}, wanted one of {', '.join(_DTYPES)}")
    return arrays, dtypes["x"]


def step(
    params: Mapping[str, Any],
    x: Any,
    dy: Any,
    /,
    *,
    strategy: str,
    world_size: int,
    lr: float = 0.1,
    microbatches: int = 1,
    schedule: str = "gpipe",
    tp_size: int | None = None,
    timeout: float = 120.0,
) -> StepResult:
    return _step(
        params,
        x,
        dy,
        strategy=strategy,
        world_size=world_size,
        lr=lr,
        microbatches=microbatches,
        schedule=schedule,
        tp_size=tp_size,
        timeout=timeout,
    )


def _step(
    params: Mapping[str, Any],
    x: Any,
    dy: Any,
    *,
    strategy: str,
    world_size: int,
    lr: float,
    microbatches: int,
    schedule: str,
    tp_size: int | None,
    timeout: float,
    repeats: int = 1,
) -> StepResult:
    arrays, dtype = _prepare("step", params, x, dy)
    shape = spec.mlp_shape(
        "step", {k: v for k, v in arrays.items() if k not in ("x", "dy")}, arrays["x"], arrays["dy"], dtype
    )
    spec.check_step(strategy, shape, world_size, microbatches=microbatches, tp_size=tp_size, schedule=schedule)
    t = (spec.default_tp_size(world_size) if tp_size is None else tp_size) if strategy == "dp_tp" else world_size
    cfg = dict(
        strategy=strategy, dtype=dtype, lr=lr, microbatches=microbatches, schedule=schedule, tp_size=t, repeats=repeats
    )
    ranks = launch(world_size, cfg, arrays, timeout=timeout)
    return _result(strategy, world_size, t, ranks)


def _result(strategy: str, n: int, t: int, ranks: list[dict[str, Any]]) -> StepResult:
    full = _assemble(strategy, n, t, ranks)
    by_rank = tuple(sum(c.bytes_per_device for c in r["log"]) for r in ranks)
    busiest = max(range(n), key=lambda r: by_rank[r])
    return StepResult(
        strategy,
        n,
        full["output"],
        full["input_grad"],
        full["grads"],
        full["params"],
        tuple(ranks[busiest]["log"]),
        by_rank,
        max(r["param_bytes"] for r in ranks),
        max(r["seconds"] for r in ranks),
    )


def max_world_size() -> int | None:
    return None  # processes: NCCL when every rank has a GPU, gloo otherwise


def single_step(params: Mapping[str, Any], x: Any, dy: Any, /, *, lr: float = 0.1) -> StepResult:
    arrays, dtype = _prepare("single_step", params, x, dy)
    shape = spec.mlp_shape(
        "single_step", {k: v for k, v in arrays.items() if k not in ("x", "dy")}, arrays["x"], arrays["dy"], dtype
    )
    dt = _DTYPES[dtype]
    ct = torch.float64 if dt == torch.float64 else torch.float32
    full = {k: torch.from_numpy(v).to(dt).to(ct) for k, v in arrays.items()}
    x_, dy_ = full.pop("x"), full.pop("dy")
    start = time.perf_counter()
    h, saved = _forward_all(x_, [(full[a], full[b]) for a, b in map(_names, range(shape.layers))], dt)
    g, grads = dy_, {}
    for l in reversed(range(shape.layers)):
        ki, ko = _names(l)
        g, grads[ki], grads[ko] = _layer_backward(saved[l], full[ki], full[ko], g, dt)
    new = {k: _sgd(full[k], grads[k], lr, dt) for k in full}
    seconds = time.perf_counter() - start
    return StepResult(
        "single",
        1,
        _to_numpy(h.to(dt)),
        _to_numpy(g.to(dt)),
        {k: _to_numpy(v.to(dt)) for k, v in grads.items()},
        {k: _to_numpy(v) for k, v in new.items()},
        (),
        (0,),
        shape.param_bytes,
        seconds,
    )


# torchrun entry point: python -m tensorglot_torch.parallel --strategy fsdp [--world-size N]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tensorglot_torch.parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", required=True, choices=spec.STRATEGIES)
    ap.add_argument("--world-size", type=int, default=2, help="ranks to spawn when not under torchrun")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--d-ff", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedule", choices=spec.SCHEDULES, default="1f1b")
    ap.add_argument("--tp-size", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)
    shape = spec.MLPShape(args.layers, args.batch, args.d_model, args.d_ff, args.dtype)
    params, x, dy = spec.init_mlp(shape)
    arrays = {k: v.astype(np.float32) for k, v in {**params, "x": x, "dy": dy}.items()}
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    n = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.world_size
    spec.check_step(
        args.strategy, shape, n, microbatches=args.microbatches, tp_size=args.tp_size, schedule=args.schedule
    )
    t = (spec.default_tp_size(n) if args.tp_size is None else args.tp_size) if args.strategy == "dp_tp" else n
    cfg = dict(
        strategy=args.strategy,
        dtype=args.dtype,
        lr=0.1,
        microbatches=args.microbatches,
        schedule=args.schedule,
        tp_size=t,
    )
    if under_torchrun:
        rank = int(os.environ["RANK"])
        backend, device = _device(int(os.environ.get("LOCAL_RANK", rank)), n)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        try:
            mine = _run_rank(rank, n, cfg, arrays, device)
            ranks: list[Any] = [None] * n
            dist.all_gather_object(ranks, mine)  # to assemble on the host: outside the step, not counted
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        ranks = launch(n, cfg, arrays, timeout=120.0)
    result = _result(args.strategy, n, t, ranks)
    ref = single_step({k: arrays[k] for k in params}, arrays["x"], arrays["dy"])
    err = max(
        float(np.abs(a - b).max())
        for a, b in [
            (result.output, ref.output),
            *((result.grads[k], ref.grads[k]) for k in params),
            *((result.params[k], ref.params[k]) for k in params),
        ]
    )
    cost = spec.step_cost(
        args.strategy, shape, n, microbatches=args.microbatches, tp_size=args.tp_size, schedule=args.schedule
    )
    print(
        json.dumps(
            {
                "strategy": args.strategy,
                "world_size": n,
                "max_abs_error": err,
                "bytes_per_device_measured": result.bytes_per_device,
                "bytes_per_device_model": cost.bytes_per_device,
                "param_bytes_per_rank": result.param_bytes_per_rank,
                "seconds_per_step": result.seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
