"""The MLP a parallel step trains, written once: its layer, SGD, the one-device step, and each strategy's
part of the step on one rank.

Every function takes its array namespace from its inputs (array-api-compat), so the same code runs on
NumPy arrays, torch tensors and traced JAX arrays. Arrays live in the step's dtype; each product is
computed in float32 (float64 stays float64) and rounded back, so a bfloat16 step stores every layer
output, gradient, update and communicated tensor in bfloat16.

`rank_step` is an SPMD program: every rank runs it with its own `Collectives`, and the collectives it
issues, in order, are those `step_cost` counts. `gather_result` joins the ranks' pieces, outside the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .collectives import Collectives
from .cost import Collective
from .schedules import pipeline_schedule
from .step import ITEMSIZE, MLPShape, StepConfig, StepResult, step_result
from .transformer_shards import take

Array = Any
Saved = tuple[Array, Array]  # a layer's input x (B, D) and pre-activation (B, F), what its backward needs


def param_names(layers: int, /) -> list[str]:
    """``layers.{l}.w_in``, ``layers.{l}.w_out`` for each layer, in order.

    >>> param_names(2)
    ['layers.0.w_in', 'layers.0.w_out', 'layers.1.w_in', 'layers.1.w_out']
    """
    return [f"layers.{l}.{w}" for l in range(layers) for w in ("w_in", "w_out")]


def _names(l: int) -> tuple[str, str]:
    return f"layers.{l}.w_in", f"layers.{l}.w_out"


def init_mlp(shape: MLPShape, /, *, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Deterministic float64 ``(params, x, dy)`` for a step: w ~ N(0, 1/fan_in), x and dy ~ N(0, 1).

    >>> params, x, dy = init_mlp(MLPShape(layers=2, batch=8, d_model=4, d_ff=16))
    >>> params["layers.1.w_out"].shape, x.shape, dy.shape
    ((16, 4), (8, 4), (8, 4))
    """
    rng = np.random.default_rng(seed)
    D, F = shape.d_model, shape.d_ff
    params = {}
    for l in range(shape.layers):
        params[f"layers.{l}.w_in"] = rng.standard_normal((D, F)) / np.sqrt(D)
        params[f"layers.{l}.w_out"] = rng.standard_normal((F, D)) / np.sqrt(F)
    x = rng.standard_normal((shape.batch, D))
    dy = rng.standard_normal((shape.batch, D))
    return params, x, dy


def mlp_shape(fn: str, params: Mapping[str, Any], x: Any, dy: Any, dtype: str) -> MLPShape:
    """The `MLPShape` of a step's inputs, or a ValueError naming what does not fit."""
    layers = len(params) // 2
    if layers < 1 or sorted(params) != sorted(param_names(layers)):
        raise ValueError(
            f"{fn}: params must be named {param_names(max(layers, 1))[:2]}... for L layers, got {sorted(params)}"
        )
    if len(x.shape) != 2:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}, wanted (B, D)")
    B, D = (int(s) for s in x.shape)
    F = int(params["layers.0.w_in"].shape[1]) if len(params["layers.0.w_in"].shape) == 2 else 0
    for l in range(layers):
        for name, want, axes in ((f"layers.{l}.w_in", (D, F), "(D, F)"), (f"layers.{l}.w_out", (F, D), "(F, D)")):
            if tuple(params[name].shape) != want:
                raise ValueError(f"{fn}: {name} has shape {tuple(params[name].shape)}, wanted {axes} = {want}")
    if tuple(dy.shape) != (B, D):
        raise ValueError(f"{fn}: dy has shape {tuple(dy.shape)}, wanted the output's (B, D) = {(B, D)}")
    return MLPShape(layers=layers, batch=B, d_model=D, d_ff=F, dtype=dtype)


# The layer, forward and backward in two halves (fsdp gathers w_out and w_in one at a time in backward).


def _compute(x: Array) -> Array:
    xp = array_namespace(x)
    ct = xp.float64 if x.dtype == xp.float64 else xp.float32
    return x if x.dtype == ct else xp.astype(x, ct)


def _round(x: Array, dtype: Any) -> Array:
    return x if x.dtype == dtype else array_namespace(x).astype(x, dtype)


def layer_forward(x: Array, w_in: Array, w_out: Array, /) -> tuple[Array, Saved]:
    """``relu(x @ w_in) @ w_out`` (B, D), and what the backward needs."""
    xp = array_namespace(x)
    pre = _compute(x) @ _compute(w_in)  # (B, F)
    return _round(xp.clip(pre, min=0) @ _compute(w_out), x.dtype), (x, pre)


def out_backward(saved: Saved, w_out: Array, dy: Array, /) -> tuple[Array, Array]:
    """Back through ``w_out`` and the relu: (d pre (B, F) in the compute dtype, dw_out (F, D))."""
    xp = array_namespace(dy)
    _, pre = saved
    g = _compute(dy)
    dw_out = xp.clip(pre, min=0).T @ g  # (F, D)
    return xp.where(pre > 0, g @ _compute(w_out).T, 0.0), _round(dw_out, dy.dtype)


def in_backward(saved: Saved, w_in: Array, dpre: Array, /) -> tuple[Array, Array]:
    """Back through ``w_in``: (dx (B, D), dw_in (D, F))."""
    x, _ = saved
    return _round(dpre @ _compute(w_in).T, x.dtype), _round(_compute(x).T @ dpre, x.dtype)


def layer_backward(saved: Saved, w_in: Array, w_out: Array, dy: Array, /) -> tuple[Array, Array, Array]:
    """(dx, dw_in, dw_out) of one layer from the gradient of its output."""
    dpre, dw_out = out_backward(saved, w_out, dy)
    dx, dw_in = in_backward(saved, w_in, dpre)
    return dx, dw_in, dw_out


def sgd(w: Array, g: Array, lr: float, /) -> Array:
    """``w − lr·g`` in the compute dtype, rounded to w's."""
    return _round(_compute(w) - lr * _compute(g), w.dtype)


def _update(params: Mapping[str, Array], grads: Mapping[str, Array], lr: float) -> dict[str, Array]:
    return {k: sgd(w, grads[k], lr) for k, w in params.items()}


def _forward(h: Array, params: Mapping[str, Array], layers: Sequence[int]) -> tuple[Array, list[Saved]]:
    saved = []
    for l in layers:
        h, s = layer_forward(h, *(params[k] for k in _names(l)))
        saved.append(s)
    return h, saved


def one_device_step(
    params: Mapping[str, Array], x: Array, dy: Array, /, *, lr: float
) -> tuple[Array, Array, dict[str, Array], dict[str, Array]]:
    """The step on one device, no collectives: (output, input gradient, gradients, updated params)."""
    L = len(params) // 2
    y, saved = _forward(x, params, range(L))
    g, grads = dy, {}
    for l in reversed(range(L)):
        ki, ko = _names(l)
        g, grads[ki], grads[ko] = layer_backward(saved[l], params[ki], params[ko], g)
    return y, g, grads, _update(params, grads, lr)


# One rank's part of a step, per strategy.


@dataclass
class RankPieces:
    """One rank's part of a step's result: its output and input gradient (None on pp's stages that have
    none) and its shards of the gradients and the updated parameters."""

    output: Array | None
    input_grad: Array | None
    grads: dict[str, Array]
    params: dict[str, Array]

    def map(self, fn: Callable[[Array], Any]) -> RankPieces:
        """The same pieces with ``fn`` applied to every array (to the host, say)."""
        return RankPieces(
            None if self.output is None else fn(self.output),
            None if self.input_grad is None else fn(self.input_grad),
            {k: fn(v) for k, v in self.grads.items()},
            {k: fn(v) for k, v in self.params.items()},
        )


def _part(x: Array, i: int, k: int, axis: int = 0) -> Array:
    """The i-th of k equal parts of x along axis 0 or 1 (an i JAX knows only when it runs, too: `take`)."""
    return take(x, (axis, i, k))


def _dp(comm: Collectives, ps: dict[str, Array], x: Array, dy: Array, c: StepConfig) -> RankPieces:
    """The batch split n ways; each gradient all-reduced as soon as backward produces it."""
    n, L = comm.world_size, len(ps) // 2
    y, saved = _forward(_part(x, comm.rank, n), ps, range(L))  # (B/n, D)
    g, grads = _part(dy, comm.rank, n), {}
    for l in reversed(range(L)):
        ki, ko = _names(l)
        g, gi, go = layer_backward(saved[l], ps[ki], ps[ko], g)
        grads[ko] = comm.all_reduce(go, tensor=f"{ko} grad")
        grads[ki] = comm.all_reduce(gi, tensor=f"{ki} grad")
    return RankPieces(y, g, grads, _update(ps, grads, c.lr))


def _tp(comm: Collectives, ps: dict[str, Array], x: Array, dy: Array, c: StepConfig) -> RankPieces:
    """Megatron tp inside each row of t ranks; for dp_tp, on B/d samples, then dp down each column."""
    n, t, L = comm.world_size, c.tp, len(ps) // 2
    d, row, col = n // t, comm.rank // t, comm.rank % t
    rows = [[a * t + k for k in range(t)] for a in range(d)]  # rank = dp_index·t + tp_index
    cols = [[a * t + k for a in range(d)] for k in range(t)]
    ws = {}  # this rank's columns of w_in (D, F/t) and rows of w_out (F/t, D)
    for l in range(L):
        ki, ko = _names(l)
        ws[ki], ws[ko] = _part(ps[ki], col, t, axis=1), _part(ps[ko], col, t)
    h, saved = _part(x, row, d), []  # (B/d, D)
    for l in range(L):
        part, s = layer_forward(h, *(ws[k] for k in _names(l)))
        saved.append(s)
        h = comm.all_reduce(part, tensor=f"layers.{l} output", groups=rows)
    g, grads = _part(dy, row, d), {}
    for l in reversed(range(L)):
        ki, ko = _names(l)
        part, grads[ki], grads[ko] = layer_backward(saved[l], ws[ki], ws[ko], g)
        g = comm.all_reduce(part, tensor=f"layers.{l} input grad", groups=rows)
    if c.strategy == "dp_tp":
        for l in reversed(range(L)):
            ki, ko = _names(l)
            grads[ko] = comm.all_reduce(grads[ko], tensor=f"layers.{l}.w_out grad shard", groups=cols)
            grads[ki] = comm.all_reduce(grads[ki], tensor=f"layers.{l}.w_in grad shard", groups=cols)
    return RankPieces(h, g, grads, _update(ws, grads, c.lr))


def _fsdp(comm: Collectives, ps: dict[str, Array], x: Array, dy: Array, c: StepConfig) -> RankPieces:
    """The batch and every parameter's first axis split n ways; a parameter is gathered before each use."""
    n, r, L = comm.world_size, comm.rank, len(ps) // 2
    shard = {k: _part(v, r, n) for k, v in ps.items()}  # all this rank keeps
    h, saved = _part(x, r, n), []  # (B/n, D)
    for l in range(L):
        ki, ko = _names(l)
        # the full weights are dropped after use and gathered again for backward
        h, s = layer_forward(h, comm.all_gather(shard[ki], tensor=ki), comm.all_gather(shard[ko], tensor=ko))
        saved.append(s)
    g, grads = _part(dy, r, n), {}
    for l in reversed(range(L)):
        ki, ko = _names(l)
        dpre, go = out_backward(saved[l], comm.all_gather(shard[ko], tensor=ko), g)
        grads[ko] = comm.reduce_scatter(go, tensor=f"{ko} grad")
        g, gi = in_backward(saved[l], comm.all_gather(shard[ki], tensor=ki), dpre)
        grads[ki] = comm.reduce_scatter(gi, tensor=f"{ki} grad")
    return RankPieces(h, g, grads, _update(shard, grads, c.lr))


def _pp(comm: Collectives, ps: dict[str, Array], x: Array, dy: Array, c: StepConfig) -> RankPieces:
    """Stage i of p holds L/p layers and runs its rows of `pipeline_schedule` on m microbatches."""
    p, i, m = comm.world_size, comm.rank, c.microbatches
    per = len(ps) // 2 // p
    mine = range(i * per, (i + 1) * per)
    stage = {k: ps[k] for l in mine for k in _names(l)}
    xp = array_namespace(x)
    sums = {k: xp.zeros_like(_compute(w)) for k, w in stage.items()}  # gradients summed over microbatches
    stash: dict[int, list[Saved]] = {}
    ys: dict[int, Array] = {}
    dxs: dict[int, Array] = {}
    for _, s, op, j in pipeline_schedule(c.schedule, p, m):
        if s != i:
            continue
        if op == "F":
            h = _part(x, j, m) if i == 0 else comm.recv(_part(x, j, m), src=i - 1)  # (B/m, D)
            h, stash[j] = _forward(h, stage, mine)
            if i < p - 1:
                comm.send(h, dst=i + 1, tensor=f"microbatch {j} activation")
            else:
                ys[j] = h
            continue
        g = _part(dy, j, m) if i == p - 1 else comm.recv(_part(dy, j, m), src=i + 1)
        for l, saved in zip(reversed(mine), reversed(stash.pop(j))):
            ki, ko = _names(l)
            g, gi, go = layer_backward(saved, stage[ki], stage[ko], g)
            sums[ki], sums[ko] = sums[ki] + _compute(gi), sums[ko] + _compute(go)
        if i > 0:
            comm.send(g, dst=i - 1, tensor=f"microbatch {j} grad")
        else:
            dxs[j] = g
    grads = {k: _round(v, x.dtype) for k, v in sums.items()}
    y = xp.concat([ys[j] for j in range(m)]) if ys else None
    dx = xp.concat([dxs[j] for j in range(m)]) if dxs else None
    return RankPieces(y, dx, grads, _update(stage, grads, c.lr))


_STRATEGY = {"dp": _dp, "tp": _tp, "fsdp": _fsdp, "pp": _pp, "dp_tp": _tp}


def rank_step(comm: Collectives, params: dict[str, Array], x: Array, dy: Array, config: StepConfig, /) -> RankPieces:
    """This rank's part of the step ``config`` describes; params, x and dy are the full arrays, in its dtype."""
    return _STRATEGY[config.strategy](comm, params, x, dy, config)


def gather_result(
    config: StepConfig, ranks: Sequence[RankPieces], logs: Sequence[Sequence[Collective]], seconds: float, /
) -> StepResult:
    """The ranks' pieces (host NumPy arrays, in rank order) joined into a `StepResult` (not part of the step)."""
    cat, n, t = np.concatenate, config.world_size, config.tp
    # pp: the last stage has the output, the first the input gradient; else each tp row's first rank its rows
    outs = [ranks[-1]] if config.strategy == "pp" else [ranks[r] for r in range(0, n, t)]
    ins = [ranks[0]] if config.strategy == "pp" else outs
    y, dx = cat([r.output for r in outs]), cat([r.input_grad for r in ins])

    def full(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if config.strategy == "fsdp":
            return {k: cat([q[k] for q in pieces]) for k in pieces[0]}
        if config.strategy == "pp":
            return {k: v for q in pieces for k, v in q.items()}
        # dp, tp, dp_tp: the first row's t column shards (one whole copy for dp)
        return {k: cat([q[k] for q in pieces[:t]], axis=1 if k.endswith("w_in") else 0) for k in pieces[0]}

    param_bytes = max(sum(v.size for v in r.params.values()) for r in ranks) * ITEMSIZE[config.dtype]
    grads, params = full([r.grads for r in ranks]), full([r.params for r in ranks])
    return step_result(config, y, dx, grads, params, logs, param_bytes, seconds)
