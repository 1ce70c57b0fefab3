"""The pipelines' part of a transformer step on one rank (pp, dp_pp, tp_pp, dp_tp_pp): a device walks
its rows of the schedule's table — GPipe, 1F1B, interleaved 1F1B or ZB-H1 — running each F, B and
(ZB-H1) W on its microbatch, sending activations forward and their gradients back.

ZB-H1's B is the input gradient only: each linear's input and output gradient are kept (`Deferred`)
until the stage's W for that microbatch computes the weight gradients from them (and, on the first
stage, the embedding's from the gradient B sent it). Activation memory is counted as the step runs:
a microbatch's tape from its F to its B, its W's buffers from its B to its W, and the peak is taken
while B runs, when the tape and the new buffers are both alive (`transformer_cost` predicts it).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device

from ..training import Deferred
from .collectives import nbytes
from .transformer import TransformerPieces
from .transformer_blocks import (
    WHOLE,
    Model,
    Split,
    block_backward,
    block_forward,
    embed_backward,
    embed_forward,
    head_backward,
    head_forward,
    local_config,
    weight_backward,
)
from .transformer_shards import device_names, mesh_groups, pipeline_table, take, tp_where

Array = Any


def pp_rank(rk: Any) -> TransformerPieces:
    """Stage i of p runs its rows of `pipeline_schedule` on m microbatches of its replica's B/d samples;
    activations go forward and their gradients back as sends to the same tp index of the next stage.
    With tp > 1 each stage is a Megatron group (its heads and MLP columns, the embedding and head
    replicated); with d > 1 each rank's gradients are all-reduced down its column, in one bucket.
    ``rk`` is `transformer_rank`'s `_Rank`."""
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
    zero_bubble = any(row[2] == "W" for row in table)

    def rank_of(vs: int) -> int:  # the rank of this one's replica and tp index that runs virtual stage vs
        return replica * p * t + vs % p * t + col

    sums: dict[str, Array] = {}
    tapes: dict[tuple[int, int], Any] = {}
    waiting: dict[tuple[int, int], tuple[Deferred, Array | None, int]] = {}  # ZB-H1: B done, W to come
    loss, ran, held, peak = 0.0, [], 0, 0  # held: the bytes of tapes (and W's buffers) kept
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
            head = None
            if vs < V - 1:
                comm.send(x, dst=rank_of(vs + 1), tensor=f"microbatch {j} activation", tag=2 * (vs * m + j))
            else:
                value, head = head_forward(model, stage, x, tgt)
                loss += float(value) / (m * d * t)  # each of the t ranks of the last stage holds it
            tapes[j, ch] = (saved, head)
            held += unique_bytes(tape_arrays(saved, head))
            peak = max(peak, held)
            continue
        if op == "W":
            pending, first, size = waiting.pop((j, ch))
            weight_backward(model, pending, grads)
            if first is not None:  # the first stage's W: the embedding's gradient from what B sent it
                grads["embed"] = embed_backward(model, first, tok)
            held -= size
        else:
            saved, head = tapes.pop((j, ch))
            deferred: Deferred | None = [] if zero_bubble else None
            if vs == V - 1:
                dx = head_backward(model, stage, head, tgt, 1.0 / (m * d), grads, deferred)
            else:
                dx = comm.recv(like, src=rank_of(vs + 1), tag=2 * ((vs + 1) * m + j) + 1)
            for blk, tape in zip(reversed(blocks), reversed(saved)):
                dx = block_backward(model, stage, dx, blk, tape, grads, split, deferred)
            if vs > 0:
                comm.send(dx, dst=rank_of(vs - 1), tensor=f"microbatch {j} grad", tag=2 * (vs * m + j) + 1)
            elif deferred is None:
                grads["embed"] = embed_backward(model, dx, tok)
            arrays = tape_arrays(saved, head)
            kept = [a for _, x, dy, _ in deferred or () for a in (x, dy)] + ([dx] if vs == 0 and zero_bubble else [])
            # W's buffers share some of the tape
            peak = max(peak, held - unique_bytes(arrays) + unique_bytes(arrays + kept))
            held += unique_bytes(kept) - unique_bytes(arrays)
            if deferred is not None:
                waiting[j, ch] = (deferred, dx if vs == 0 else None, unique_bytes(kept))
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


def tape_bytes(blocks: list[dict[str, Array]], head: tuple | None) -> int:
    """The bytes of the tapes of ``blocks`` and the head (None: none)."""
    return unique_bytes(tape_arrays(blocks, head))


def tape_arrays(blocks: list[dict[str, Array]], head: tuple | None) -> list[Array]:
    """What a microbatch's forward keeps for its backward: each block's tape and the head's."""
    arrays = [a for tape in blocks for a in tape.values() if hasattr(a, "shape")]  # not the causal flag, a None mask
    return arrays + list(head or ())


def unique_bytes(arrays: list[Array]) -> int:
    """The bytes of ``arrays``, each array once (W's buffers hold some of the tape's)."""
    return sum(nbytes(a) for a in {id(a): a for a in arrays}.values())
