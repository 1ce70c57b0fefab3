"""Each strategy's part of a transformer training step on one rank, written once over `Collectives`: an
SPMD program NumPy's simulated mesh runs on threads and torch on processes (`transformer_rank`).

The collectives a rank issues, in order, are those `transformer_cost` counts. The model's units are
`transformer_blocks`'; the strategies differ only in which weights a unit is handed (whole, gathered
from flat shards, a tensor-parallel rank's), what happens when its backward is done (an all-reduce, a
reduce-scatter, nothing), and how the sublayers meet the residual stream (`Split`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace, device

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
from .transformer_ring import cp_rank
from .transformer_shards import device_names, flat_where, mesh_groups, pipeline_table, take, tp_where

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
    loss, grads = rk.layers.value_and_grad(tok, tgt, rk.params, rk.config)
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


def _pp(rk: _Rank) -> TransformerPieces:
    """Stage i of p runs its rows of `pipeline_schedule` on m microbatches of its replica's B/d samples;
    activations go forward and their gradients back as sends to the same tp index of the next stage.
    With tp > 1 each stage is a Megatron group (its heads and MLP columns, the embedding and head
    replicated); with d > 1 each rank's gradients are all-reduced down its column, in one bucket."""
    comm, xp, c, m, p, t = rk.comm, rk.xp, rk.config, rk.step.microbatches, rk.step.pp, rk.step.tp
    d, replica, i, col = rk.n // (p * t), rk.r // (p * t), rk.r // t % p, rk.r % t
    v, table = pipeline_table(rk.step.schedule, p, m, rk.step.chunks)
    V, per = p * v, c.n_layers // (p * v)  # virtual stages; chunk ch of device i is virtual stage ch·p + i
    names = device_names(c, i, p, v)
    wheres = {k: tp_where(k, c, t, col) for k in names}
    stage = {k: take(rk.params[k], wheres[k]) for k in names}
    rows = [[a + k for k in range(t)] for a in range(0, rk.n, t)]  # each stage's tp group
    split = WHOLE
    if t > 1:

        def all_reduce(x: Array, tensor: str) -> Array:
            return comm.all_reduce(x, tensor=tensor, groups=rows)

        split = Split(enter_grad=all_reduce, leave=all_reduce)
    model = Model(rk.layers, local_config(c, t), rk.step.dtype, xp)
    tokens, targets = rk.batch_part(rk.tokens, replica, d), rk.batch_part(rk.targets, replica, d)
    b, S = tokens.shape
    like = xp.zeros((b // m, S, c.d_model), dtype=stage[names[0]].dtype, device=device(stage[names[0]]))

    def rank_of(vs: int) -> int:  # the rank of this one's replica and tp index that runs virtual stage vs
        return replica * p * t + vs % p * t + col

    sums: dict[str, Array] = {}
    tapes: dict[tuple[int, int], Any] = {}
    loss, ran, held, peak = 0.0, [], 0, 0  # held: the bytes of the tapes kept from F to B
    for entry in table:
        _, s, op, j, ch = entry
        if s != i:
            continue
        ran.append(entry if v > 1 else entry[:4])
        vs = ch * p + i
        blocks = range(vs * per, (vs + 1) * per)
        tok, tgt = rk.batch_part(tokens, j, m), rk.batch_part(targets, j, m)
        grads: dict[str, Array] = {}
        if op == "F":  # a message's tag: 2·(its sender's virtual stage·m + j), + 1 for gradients
            x = (
                embed_forward(model, stage, tok)
                if vs == 0
                else comm.recv(like, src=rank_of(vs - 1), tag=2 * ((vs - 1) * m + j))
            )
            saved = []
            for blk in blocks:
                x, tape = block_forward(model, stage, x, blk, split)
                saved.append(tape)
            if vs < V - 1:
                comm.send(x, dst=rank_of(vs + 1), tensor=f"microbatch {j} activation", tag=2 * (vs * m + j))
                tapes[j, ch] = (saved, None)
                held += _tape_bytes(saved, None)
            else:
                value, head = head_forward(model, stage, x, tgt)
                loss += float(value) / (m * d * t)  # each of the t ranks of the last stage holds it
                tapes[j, ch] = (saved, head)
                held += _tape_bytes(saved, head)
            continue
        peak = max(peak, held)
        saved, head = tapes.pop((j, ch))
        held -= _tape_bytes(saved, head)
        if vs == V - 1:
            dx = head_backward(model, stage, head, tgt, 1.0 / (m * d), grads)
        else:
            dx = comm.recv(like, src=rank_of(vs + 1), tag=2 * ((vs + 1) * m + j) + 1)
        for blk, tape in zip(reversed(blocks), reversed(saved)):
            dx = block_backward(model, stage, dx, blk, tape, grads, split)
        if vs > 0:
            comm.send(dx, dst=rank_of(vs - 1), tensor=f"microbatch {j} grad", tag=2 * (vs * m + j) + 1)
        else:
            grads["embed"] = embed_backward(model, dx, tok)
        for k, g in grads.items():
            sums[k] = g if k not in sums else sums[k] + g
    if c.n_kv_heads % t:  # K < t: the t/K ranks of a stage that share a kv head sum its gradient
        per = t // c.n_kv_heads
        kv_groups = [[a + kv * per + q for q in range(per)] for a in range(0, rk.n, t) for kv in range(c.n_kv_heads)]
        for k in names:
            if k.endswith((".wk", ".wv")):
                sums[k] = comm.all_reduce(sums[k], tensor=f"{k} grad", groups=kv_groups)
    if d > 1:  # one bucket per stage: the stages hold different tensors, and every rank joins each collective
        _, cols = mesh_groups(rk.n, p * t)
        flat = xp.concat([xp.reshape(sums[k], (-1,)) for k in names])
        flat = comm.all_reduce(flat, tensor=f"stage {i} grads", groups=cols)
        start = 0
        for k in names:
            size = math.prod(sums[k].shape)
            sums[k], start = xp.reshape(flat[start : start + size], sums[k].shape), start + size
    mine = {k: (stage[k], wheres[k]) for k in names}
    report = ran if replica == 0 and col == 0 else []
    out = rk.pieces(loss, {k: (sums[k], wheres[k]) for k in names}, mine, report)
    out.memory["activations"] = peak
    return out


def _tape_bytes(blocks: list[dict[str, Array]], head: tuple | None) -> int:
    """What a microbatch's forward keeps for its backward: each block's tape and the head's."""
    arrays = [a for tape in blocks for a in tape.values() if hasattr(a, "shape")]  # not the causal flag, a None mask
    return sum(nbytes(a) for a in arrays) + sum(nbytes(a) for a in head or ())


_STRATEGY: dict[str, Callable[[_Rank], TransformerPieces]] = {"dp": _dp, "zero1": _dp, "zero2": _zero2_fsdp}
_STRATEGY |= {"fsdp": _zero2_fsdp, "tp": _tp, "tp_sp": _tp, "pp": _pp, "dp_tp": _tp, "dp_pp": _pp, "cp": cp_rank}
_STRATEGY |= {"tp_pp": _pp, "dp_tp_pp": _pp, "fsdp_tp": fsdp_tp_rank}


def transformer_rank(
    comm: Collectives, layers: Any, task: Task, native: Callable[[Any], Array], /
) -> TransformerPieces:
    """This rank's part of ``task`` on ``layers`` (a backend's), ``native`` bringing host arrays to it."""
    return _STRATEGY[task.step.strategy](_Rank(comm, layers, task, native))
