"""NumPy parallel strategies on a simulated mesh: see the spec (`tensorglot.parallel`).

The readable reference. A `Mesh` holds n ranks; a value that lives on every rank is a list with one
array per rank, and each collective is an array operation on such lists that records, for every rank
in the group, what it sent. The strategies are written in lock-step over the ranks, in the order a
real SPMD program would issue them, so the logs are the ones the torch and jax backends must match.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorglot import parallel as spec
from tensorglot.parallel import Collective, StepResult

from ._common import as_float

Shards = list[np.ndarray]  # one array per rank


class Mesh:
    """n simulated devices; ``groups`` partition the ranks (default: one group of all)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.log: list[list[Collective]] = [[] for _ in range(n)]

    def _groups(self, groups: list[list[int]] | None) -> list[list[int]]:
        return groups if groups is not None else [list(range(self.n))]

    def _record(self, kind: str, tensor: str, v: np.ndarray, group: list[int]) -> None:
        for r in group:
            self.log[r].append(Collective(kind, tensor, v.nbytes, len(group)))

    def all_reduce(self, xs: Shards, tensor: str, groups: list[list[int]] | None = None) -> Shards:
        out = list(xs)
        for g in self._groups(groups):
            total = np.sum([xs[r] for r in g], axis=0)
            self._record("all_reduce", tensor, total, g)
            for r in g:
                out[r] = total.astype(xs[r].dtype)
        return out

    def all_gather(self, shards: Shards, tensor: str) -> Shards:
        full = np.concatenate(shards, axis=0)
        self._record("all_gather", tensor, full, list(range(self.n)))
        return [full] * self.n

    def reduce_scatter(self, xs: Shards, tensor: str) -> Shards:
        total = np.sum(xs, axis=0).astype(xs[0].dtype)
        self._record("reduce_scatter", tensor, total, list(range(self.n)))
        return np.split(total, self.n, axis=0)

    def send(self, x: np.ndarray, src: int, tensor: str) -> np.ndarray:
        self.log[src].append(Collective("send", tensor, x.nbytes, 2))
        return x.copy()


# The layer, forward and backward: every strategy runs these on its shards.


def layer_forward(x: np.ndarray, w_in: np.ndarray, w_out: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    pre = x @ w_in  # (B, F)
    h = np.maximum(pre, 0)
    return h @ w_out, (x, pre, h)


def layer_backward(saved: tuple[np.ndarray, ...], w_in: np.ndarray, w_out: np.ndarray, dy: np.ndarray):
    x, pre, h = saved
    dw_out = h.T @ dy  # (F, D)
    dh = (dy @ w_out.T) * (pre > 0)  # (B, F)
    return dh @ w_in.T, x.T @ dh, dw_out  # dx, dw_in, dw_out


def _prepare(
    fn: str, params: Mapping[str, Any], x: Any, dy: Any
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, spec.MLPShape]:
    x = as_float(fn, "x", x)
    dy = as_float(fn, "dy", dy).astype(x.dtype)
    ps = {k: as_float(fn, k, v).astype(x.dtype) for k, v in params.items()}
    return ps, x, dy, spec.mlp_shape(fn, ps, x, dy, str(x.dtype))


def _sgd(w: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
    return (w - lr * g).astype(w.dtype)


def max_world_size() -> int | None:
    return None


def single_step(params: Mapping[str, Any], x: Any, dy: Any, /, *, lr: float = 0.1) -> StepResult:
    ps, x, dy, shape = _prepare("single_step", params, x, dy)
    start = time.perf_counter()
    L = shape.layers
    h, saved = x, []
    for l in range(L):
        h, s = layer_forward(h, ps[f"layers.{l}.w_in"], ps[f"layers.{l}.w_out"])
        saved.append(s)
    g, grads = dy, {}
    for l in reversed(range(L)):
        g, grads[f"layers.{l}.w_in"], grads[f"layers.{l}.w_out"] = layer_backward(
            saved[l], ps[f"layers.{l}.w_in"], ps[f"layers.{l}.w_out"], g
        )
    new = {k: _sgd(ps[k], grads[k], lr) for k in ps}
    seconds = time.perf_counter() - start
    return StepResult("single", 1, h, g, grads, new, (), (0,), shape.param_bytes, seconds)


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
    ps, x, dy, shape = _prepare("step", params, x, dy)
    spec.check_step(strategy, shape, world_size, microbatches=microbatches, tp_size=tp_size, schedule=schedule)
    mesh = Mesh(world_size)
    start = time.perf_counter()
    if strategy == "pp":
        out = _pp(mesh, ps, x, dy, shape, lr, microbatches, schedule)
    elif strategy == "dp_tp":
        out = _dp_tp(mesh, ps, x, dy, shape, lr, spec.default_tp_size(world_size) if tp_size is None else tp_size)
    else:
        out = {"dp": _dp, "tp": _tp, "fsdp": _fsdp}[strategy](mesh, ps, x, dy, shape, lr)
    seconds = time.perf_counter() - start
    y, dx, grads, new, param_bytes = out
    by_rank = tuple(sum(c.bytes_per_device for c in log) for log in mesh.log)
    busiest = max(range(world_size), key=lambda r: by_rank[r])
    return StepResult(strategy, world_size, y, dx, grads, new, tuple(mesh.log[busiest]), by_rank, param_bytes, seconds)


def _names(l: int) -> tuple[str, str]:
    return f"layers.{l}.w_in", f"layers.{l}.w_out"


def _dp(mesh: Mesh, ps: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray, shape: spec.MLPShape, lr: float):
    n, L = mesh.n, shape.layers
    hs, dys = np.split(x, n), np.split(dy, n)  # (B/n, D) on each rank
    saved: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(n)]
    for l in range(L):
        wi, wo = (ps[k] for k in _names(l))
        for r in range(n):
            hs[r], s = layer_forward(hs[r], wi, wo)
            saved[r].append(s)
    grads = {}
    for l in reversed(range(L)):
        wi, wo = (ps[k] for k in _names(l))
        gi, go = [], []
        for r in range(n):
            dys[r], a, b = layer_backward(saved[r][l], wi, wo, dys[r])
            gi.append(a)
            go.append(b)
        grads[_names(l)[1]] = mesh.all_reduce(go, f"layers.{l}.w_out grad")[0]
        grads[_names(l)[0]] = mesh.all_reduce(gi, f"layers.{l}.w_in grad")[0]
    new = {k: _sgd(ps[k], grads[k], lr) for k in ps}  # every rank does the same update
    return np.concatenate(hs), np.concatenate(dys), grads, new, shape.param_bytes


def _tp(mesh: Mesh, ps: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray, shape: spec.MLPShape, lr: float):
    n, L = mesh.n, shape.layers
    # rank r holds columns r of w_in (D, F/n) and rows r of w_out (F/n, D)
    w_in = [np.split(ps[f"layers.{l}.w_in"], n, axis=1) for l in range(L)]
    w_out = [np.split(ps[f"layers.{l}.w_out"], n, axis=0) for l in range(L)]
    hs = [x] * n
    saved: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(n)]
    for l in range(L):
        partial = []
        for r in range(n):
            p, s = layer_forward(hs[r], w_in[l][r], w_out[l][r])
            partial.append(p)
            saved[r].append(s)
        hs = mesh.all_reduce(partial, f"layers.{l} output")
    dys = [dy] * n
    g_in: list[Shards] = [[] for _ in range(L)]
    g_out: list[Shards] = [[] for _ in range(L)]
    for l in reversed(range(L)):
        partial = []
        for r in range(n):
            p, a, b = layer_backward(saved[r][l], w_in[l][r], w_out[l][r], dys[r])
            partial.append(p)
            g_in[l].append(a)
            g_out[l].append(b)
        dys = mesh.all_reduce(partial, f"layers.{l} input grad")
    grads, new = {}, {}
    for l in range(L):
        ki, ko = _names(l)
        grads[ki], grads[ko] = np.concatenate(g_in[l], axis=1), np.concatenate(g_out[l], axis=0)
        new[ki] = np.concatenate([_sgd(w, g, lr) for w, g in zip(w_in[l], g_in[l])], axis=1)
        new[ko] = np.concatenate([_sgd(w, g, lr) for w, g in zip(w_out[l], g_out[l])], axis=0)
    return hs[0], dys[0], grads, new, sum(w_in[l][0].nbytes + w_out[l][0].nbytes for l in range(L))


def _fsdp(mesh: Mesh, ps: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray, shape: spec.MLPShape, lr: float):
    n, L = mesh.n, shape.layers
    shard = {k: np.split(v, n, axis=0) for k, v in ps.items()}  # each rank keeps 1/n of every parameter
    hs, dys = np.split(x, n), np.split(dy, n)
    saved: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(n)]
    for l in range(L):
        ki, ko = _names(l)
        wi = mesh.all_gather(shard[ki], ki)
        wo = mesh.all_gather(shard[ko], ko)
        for r in range(n):
            hs[r], s = layer_forward(hs[r], wi[r], wo[r])
            saved[r].append(s)
        del wi, wo  # freed after use: gathered again for backward
    g_shard: dict[str, Shards] = {}
    for l in reversed(range(L)):
        ki, ko = _names(l)
        wo = mesh.all_gather(shard[ko], ko)
        x_saved, pre, h = zip(*(saved[r][l] for r in range(n)))
        g_shard[ko] = mesh.reduce_scatter([h[r].T @ dys[r] for r in range(n)], f"{ko} grad")
        dh = [(dys[r] @ wo[r].T) * (pre[r] > 0) for r in range(n)]  # (B/n, F)
        wi = mesh.all_gather(shard[ki], ki)
        g_shard[ki] = mesh.reduce_scatter([x_saved[r].T @ dh[r] for r in range(n)], f"{ki} grad")
        dys = [dh[r] @ wi[r].T for r in range(n)]
    grads = {k: np.concatenate(g_shard[k]) for k in ps}
    new = {k: np.concatenate([_sgd(w, g, lr) for w, g in zip(shard[k], g_shard[k])]) for k in ps}
    return np.concatenate(hs), np.concatenate(dys), grads, new, sum(v[0].nbytes for v in shard.values())


def _pp(
    mesh: Mesh,
    ps: dict[str, np.ndarray],
    x: np.ndarray,
    dy: np.ndarray,
    shape: spec.MLPShape,
    lr: float,
    m: int,
    schedule: str,
):
    p, L = mesh.n, shape.layers
    per = L // p
    layers_of = [range(i * per, (i + 1) * per) for i in range(p)]
    xs, dys = np.split(x, m), np.split(dy, m)  # (B/m, D) microbatches
    inbox: dict[tuple[str, int, int], np.ndarray] = {}  # (F|B, receiving stage, microbatch) → tensor
    saved: dict[tuple[int, int], list[tuple[np.ndarray, ...]]] = {}
    ys: list[np.ndarray] = [np.empty(0)] * m
    dxs: list[np.ndarray] = [np.empty(0)] * m
    grads = {k: np.zeros_like(v) for k, v in ps.items()}
    for _, i, op, j in spec.pipeline_schedule(schedule, p, m):
        if op == "F":
            h = xs[j] if i == 0 else inbox.pop(("F", i, j))
            saved[i, j] = []
            for l in layers_of[i]:
                h, s = layer_forward(h, *(ps[k] for k in _names(l)))
                saved[i, j].append(s)
            if i < p - 1:
                inbox["F", i + 1, j] = mesh.send(h, i, f"microbatch {j} activation")
            else:
                ys[j] = h
        else:
            g = dys[j] if i == p - 1 else inbox.pop(("B", i, j))
            for l, s in zip(reversed(layers_of[i]), reversed(saved.pop((i, j)))):
                ki, ko = _names(l)
                g, gi, go = layer_backward(s, ps[ki], ps[ko], g)
                grads[ki] += gi
                grads[ko] += go
            if i > 0:
                inbox["B", i - 1, j] = mesh.send(g, i, f"microbatch {j} grad")
            else:
                dxs[j] = g
    new = {k: _sgd(ps[k], grads[k], lr) for k in ps}
    return (
        np.concatenate(ys),
        np.concatenate(dxs),
        grads,
        new,
        sum(ps[k].nbytes for l in layers_of[0] for k in _names(l)),
    )


def _dp_tp(
    mesh: Mesh,
    ps: dict[str, np.ndarray],
    x: np.ndarray,
    dy: np.ndarray,
    shape: spec.MLPShape,
    lr: float,
    t: int,
):
    n, L = mesh.n, shape.layers
    d = n // t
    tp_groups = [[a * t + c for c in range(t)] for a in range(d)]  # rows: rank = dp_index·t + tp_index
    dp_groups = [[a * t + c for a in range(d)] for c in range(t)]
    w_in = [np.split(ps[f"layers.{l}.w_in"], t, axis=1) for l in range(L)]
    w_out = [np.split(ps[f"layers.{l}.w_out"], t, axis=0) for l in range(L)]
    xs, dys_full = np.split(x, d), np.split(dy, d)
    hs = [xs[r // t] for r in range(n)]
    saved: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(n)]
    for l in range(L):
        partial = []
        for r in range(n):
            p, s = layer_forward(hs[r], w_in[l][r % t], w_out[l][r % t])
            partial.append(p)
            saved[r].append(s)
        hs = mesh.all_reduce(partial, f"layers.{l} output", tp_groups)
    dys = [dys_full[r // t] for r in range(n)]
    g_in: list[Shards] = [[] for _ in range(L)]
    g_out: list[Shards] = [[] for _ in range(L)]
    for l in reversed(range(L)):
        partial = []
        for r in range(n):
            p, a, b = layer_backward(saved[r][l], w_in[l][r % t], w_out[l][r % t], dys[r])
            partial.append(p)
            g_in[l].append(a)
            g_out[l].append(b)
        dys = mesh.all_reduce(partial, f"layers.{l} input grad", tp_groups)
    for l in reversed(range(L)):
        g_out[l] = mesh.all_reduce(g_out[l], f"layers.{l}.w_out grad shard", dp_groups)
        g_in[l] = mesh.all_reduce(g_in[l], f"layers.{l}.w_in grad shard", dp_groups)
    grads, new = {}, {}
    for l in range(L):
        ki, ko = _names(l)
        grads[ki], grads[ko] = np.concatenate(g_in[l][:t], axis=1), np.concatenate(g_out[l][:t], axis=0)
        new[ki], new[ko] = _sgd(ps[ki], grads[ki], lr), _sgd(ps[ko], grads[ko], lr)
    y = np.concatenate([hs[a * t] for a in range(d)])
    dx = np.concatenate([dys[a * t] for a in range(d)])
    return y, dx, grads, new, sum(w_in[l][0].nbytes + w_out[l][0].nbytes for l in range(L))
