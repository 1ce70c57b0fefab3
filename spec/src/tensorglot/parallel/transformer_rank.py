"""Each strategy's part of a transformer training step on one rank, written once over `Collectives`: an
SPMD program NumPy's simulated mesh runs on threads and torch on processes (`transformer_rank`).

The collectives a rank issues, in order, are those `transformer_cost` counts. The model's units are
`transformer_blocks`'; the strategies differ only in which weights a unit is handed (whole, gathered
from flat shards, a tensor-parallel rank's), what happens when its backward is done (an all-reduce, a
reduce-scatter, nothing), and how the sublayers meet the residual stream (`Split`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace

from .collectives import Collectives, nbytes
from .transformer import Task, TransformerPieces, Where
from .transformer_blocks import (
    WHOLE,
    Model,
    Split,
    block_backward,
    block_forward,
    block_names,
    embed_backward,
    embed_forward,
    head_backward,
    head_forward,
    head_names,
    local_config,
)
from .transformer_fsdp_tp import fsdp_tp_rank
from .transformer_pipeline import pp_rank, tape_bytes
from .transformer_ring import cp_rank
from .transformer_shards import flat_where, mesh_groups, take, tp_where

Array = Any
Pieces = dict[str, tuple[Array, Where]]


class _Rank:
    """One rank's step: the task's arrays as the backend's, and the bookkeeping every strategy shares."""

    def __init__(self, comm: Collectives, layers: Any, task: Task, native: Callable[[Any], Array]) -> None:
        self.comm, self.task, self.step, self.config = comm, task, task.step, task.config
        self.native = native
        self.n, self.r = comm.world_size, comm.rank
        self.params = {k: native(v) for k, v in task.params.items()}
        self.tokens, self.targets = native(task.tokens), native(task.targets)
        self.state: dict[str, dict[str, Array]] | None = None
        if task.state is not None:
            self.state = {k: {n: native(a) for n, a in task.state[k].items()} for k in "mv"}
        self.xp = array_namespace(self.params["embed"])
        self.model = Model(layers, task.config, task.step.dtype, self.xp)
        self.layers = layers
        self.activations = 0  # the peak bytes of the units' tapes, kept from their forward to their backward

    def batch_part(self, x: Array, i: int, k: int) -> Array:
        return take(x, (0, i, k))

    def update(self, pieces: Pieces, grads: dict[str, Array]) -> tuple[Pieces, dict[str, Pieces], int]:
        """The optimizer on each piece with its slice of the state: new pieces, new state, state bytes."""
        opt, step, new = self.step.optimizer, 0, {}
        state: dict[str, Pieces] = {"m": {}, "v": {}}
        if self.task.state is not None:
            step = self.task.state["step"]  # an int, or an array where the step is traced (JAX)
        for name, (w, where) in pieces.items():
            m = v = None
            if opt.state_arrays:
                if self.state is None:
                    m = v = self.xp.zeros_like(w)
                else:
                    m, v = take(self.state["m"][name], where), take(self.state["v"][name], where)
            w, m, v = opt.update(w, grads[name], m, v, step)
            new[name] = (w, where)
            if opt.state_arrays:
                state["m"][name], state["v"][name] = (m, where), (v, where)
        state_bytes = opt.state_arrays * sum(nbytes(w) for w, _ in pieces.values())
        return new, (state if opt.state_arrays else {}), state_bytes

    def pieces(self, loss: Array, grads: Pieces, params: Pieces, schedule: list | None = None) -> TransformerPieces:
        """The rank's `TransformerPieces` once ``params`` (what it keeps between steps) are updated."""
        new, state, state_bytes = self.update(params, {k: g for k, (g, _) in grads.items()})
        memory = {
            "params": sum(nbytes(a) for a, _ in new.values()),
            "grads": sum(nbytes(a) for a, _ in grads.values()),
            "optimizer_state": state_bytes,
            "activations": self.activations,
        }
        return TransformerPieces(loss, grads, new, state, memory, schedule or [])

    def walk(
        self,
        weights: Callable[[list[str], str], dict[str, Array]],
        tokens: Array,
        targets: Array,
        dloss: float,
        split: Split = WHOLE,
        done: Callable[[list[str], dict[str, Array]], None] = lambda names, grads: None,
        model: Model | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """The whole model's forward and backward, unit by unit: ``weights(names, phase)`` hands each unit
        its weights before its forward and again before its backward, ``done(names, grads)`` sees its
        gradients as soon as its backward is over. Returns (this piece's mean loss, the gradients)."""
        m, c = model or self.model, self.config
        x = embed_forward(m, weights(["embed"], "forward"), tokens)
        tapes = []
        for i in range(c.n_layers):
            x, saved = block_forward(m, weights(block_names(c, i), "forward"), x, i, split)
            tapes.append(saved)
        loss, head = head_forward(m, weights(head_names(c), "forward"), x, targets)
        self.activations = tape_bytes(tapes, head)  # every unit's tape is alive as the backward starts
        grads: dict[str, Array] = {}
        dx = head_backward(m, weights(head_names(c), "backward"), head, targets, dloss, grads)
        done(["norm"] if c.tie_embeddings else ["norm", "lm_head"], grads)
        for i in reversed(range(c.n_layers)):
            dx = block_backward(m, weights(block_names(c, i), "backward"), dx, i, tapes[i], grads, split)
            done(block_names(c, i), grads)
        dembed = embed_backward(m, dx, tokens)
        grads["embed"] = dembed + grads["embed"] if c.tie_embeddings else dembed
        done(["embed"], grads)
        return loss, grads  # an array: float() would stop a traced (JAX) step


def _whole(d: dict[str, Array]) -> Pieces:
    return {k: (v, None) for k, v in d.items()}


def _dp(rk: _Rank) -> TransformerPieces:
    """The batch split n ways; value_and_grad on each rank, every gradient all-reduced in backward order.
    zero1 reduce-scatters them instead, updates its 1/n and all-gathers the parameters."""
    comm, n, r = rk.comm, rk.n, rk.r
    tok, tgt = rk.batch_part(rk.tokens, r, n), rk.batch_part(rk.targets, r, n)
    loss, grads = rk.walk(lambda names, phase: rk.params, tok, tgt, 1.0)  # value_and_grad, its tapes counted
    names = list(reversed(list(rk.params)))  # backward order: the head's gradients are ready first
    if rk.step.strategy == "dp":
        summed = {k: comm.all_reduce(grads[k], tensor=f"{k} grad") / n for k in names}
        return rk.pieces(loss / n, _whole(summed), _whole(rk.params))
    xp, shards = rk.xp, {}
    for k in names:
        where = flat_where(r, n)
        shards[k] = (comm.reduce_scatter(xp.reshape(grads[k], (-1,)), tensor=f"{k} grad") / n, where)
    return _zero_update(rk, loss / n, shards)


def _zero_update(rk: _Rank, loss: Array, shards: Pieces) -> TransformerPieces:
    """Update this rank's 1/n of every parameter, then all-gather each into the whole parameter."""
    own = {k: (take(rk.params[k], where), where) for k, (_, where) in shards.items()}
    new, state, state_bytes = rk.update(own, {k: g for k, (g, _) in shards.items()})
    xp, params = rk.xp, Pieces()
    for k, (w, _) in new.items():
        params[k] = (xp.reshape(rk.comm.all_gather(w, tensor=k), rk.params[k].shape), None)
    memory = {
        "params": sum(nbytes(a) for a, _ in params.values()),
        "grads": sum(nbytes(rk.params[k]) for k in shards) if rk.step.strategy == "zero1" else 0,
        "optimizer_state": state_bytes,
        "activations": rk.activations,
    }
    if rk.step.strategy == "zero2":  # only the 1/n shards outlive each unit's backward
        memory["grads"] = sum(nbytes(g) for g, _ in shards.values())
    return TransformerPieces(loss, shards, params, state, memory)


def _zero2_fsdp(rk: _Rank) -> TransformerPieces:
    """The batch split n ways, the model walked unit by unit; each unit's gradients reduce-scattered when
    its backward ends. fsdp keeps only 1/n of each parameter and gathers a unit before each use."""
    comm, n, r, xp = rk.comm, rk.n, rk.r, rk.xp
    wheres = {k: flat_where(r, n) for k in rk.params}
    shard = {k: take(v, wheres[k]) for k, v in rk.params.items()}
    fsdp = rk.step.strategy == "fsdp"

    def weights(names: list[str], phase: str) -> dict[str, Array]:
        if not fsdp:
            return rk.params
        return {k: xp.reshape(comm.all_gather(shard[k], tensor=k), rk.params[k].shape) for k in names}

    grads: Pieces = {}

    def done(names: list[str], g: dict[str, Array]) -> None:
        for k in names:
            grads[k] = (comm.reduce_scatter(xp.reshape(g.pop(k), (-1,)), tensor=f"{k} grad"), wheres[k])

    tok, tgt = rk.batch_part(rk.tokens, r, n), rk.batch_part(rk.targets, r, n)
    loss, _ = rk.walk(weights, tok, tgt, 1.0 / n, WHOLE, done)
    grads = {k: grads[k] for k in rk.params}
    if not fsdp:
        return _zero_update(rk, loss / n, grads)
    mine = {k: (shard[k], wheres[k]) for k in rk.params}
    return rk.pieces(loss / n, grads, mine)


def _tp(rk: _Rank) -> TransformerPieces:
    """Megatron: this rank's heads and MLP columns/rows inside its row of t ranks; tp_sp adds sequence
    parallel; dp_tp all-reduces each unit's gradient shards down the columns once its backward is done."""
    comm, n, r, xp, c, t = rk.comm, rk.n, rk.r, rk.xp, rk.config, rk.step.tp
    d, row, col = n // t, r // t, r % t
    rows, cols = mesh_groups(n, t)
    wheres = {k: tp_where(k, c, t, col) for k in rk.params}
    local = {k: take(v, wheres[k]) for k, v in rk.params.items()}
    kv_groups = None
    if c.n_kv_heads % t:  # K < t: the t/K ranks of a row that share a kv head sum its gradient
        per = t // c.n_kv_heads
        kv_groups = [[a * t + kv * per + j for j in range(per)] for a in range(d) for kv in range(c.n_kv_heads)]
    sp = rk.step.strategy == "tp_sp"

    def seq_gather(x: Array, tensor: str) -> Array:  # (B, S/n, D) -> (B, S, D)
        return xp.permute_dims(comm.all_gather(xp.permute_dims(x, (1, 0, 2)), tensor=tensor), (1, 0, 2))

    def seq_scatter(x: Array, tensor: str) -> Array:  # (B, S, D) partial sums -> (B, S/n, D) summed
        return xp.permute_dims(comm.reduce_scatter(xp.permute_dims(x, (1, 0, 2)), tensor=tensor), (1, 0, 2))

    def all_reduce(x: Array, tensor: str) -> Array:
        return comm.all_reduce(x, tensor=tensor, groups=rows)

    if sp:
        split = Split(enter=seq_gather, enter_grad=seq_scatter, leave=seq_scatter, leave_grad=seq_gather)
    else:
        split = Split(enter_grad=all_reduce, leave=all_reduce)

    def done(names: list[str], g: dict[str, Array]) -> None:
        for k in names:
            kind = k.rsplit(".", 1)[-1]
            if kv_groups is not None and kind in ("wk", "wv"):
                g[k] = comm.all_reduce(g[k], tensor=f"{k} grad", groups=kv_groups)
            elif sp and wheres[k] is None:  # replicated weights saw only this rank's positions
                g[k] = comm.all_reduce(g[k], tensor=f"{k} grad")
            if d > 1:
                g[k] = comm.all_reduce(g[k], tensor=f"{k} grad shard", groups=cols)

    tok, tgt = rk.batch_part(rk.tokens, row, d), rk.batch_part(rk.targets, row, d)
    if sp:  # tp_sp has d = 1: the seq all-gathers span the world
        tok, tgt = take(tok, (1, col, t)), take(tgt, (1, col, t))
    model = Model(rk.layers, local_config(c, t), rk.step.dtype, xp)
    loss, g = rk.walk(lambda names, phase: local, tok, tgt, (1.0 / t if sp else 1.0) / d, split, done, model)
    mine = {k: (local[k], wheres[k]) for k in rk.params}
    return rk.pieces(loss / n, {k: (g[k], wheres[k]) for k in rk.params}, mine)


_STRATEGY: dict[str, Callable[[_Rank], TransformerPieces]] = {"dp": _dp, "zero1": _dp, "zero2": _zero2_fsdp}
_STRATEGY |= {"fsdp": _zero2_fsdp, "tp": _tp, "tp_sp": _tp, "dp_tp": _tp, "cp": cp_rank, "fsdp_tp": fsdp_tp_rank}
_STRATEGY |= {"pp": pp_rank, "dp_pp": pp_rank, "tp_pp": pp_rank, "dp_tp_pp": pp_rank}


def transformer_rank(
    comm: Collectives, layers: Any, task: Task, native: Callable[[Any], Array], /
) -> TransformerPieces:
    """This rank's part of ``task`` on ``layers`` (a backend's), ``native`` bringing host arrays to it."""
    return _STRATEGY[task.step.strategy](_Rank(comm, layers, task, native))
