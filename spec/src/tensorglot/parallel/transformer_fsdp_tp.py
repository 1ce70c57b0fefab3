"""fsdp×tp: 2-D sharding on a (d, t) mesh, rank = fsdp_index·t + tp_index (torchtitan's FSDP2 + TP).

Inside each row of t ranks the blocks are Megatron tensor parallel (`transformer_rank`'s tp); down each
column of d ranks every rank's tensor-parallel piece is split flat again, FSDP style: a unit's pieces are
all-gathered down the column before its forward and again before its backward, and their gradients
reduce-scattered down it when the unit's backward ends. A rank keeps 1/(d·t) of the block weights
(1/d of the replicated embedding, norms and head), and the batch is split d ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .transformer_blocks import WHOLE, Model, Split, local_config
from .transformer_shards import flat_where, mesh_groups, take, tp_where

if TYPE_CHECKING:
    from .transformer import TransformerPieces, Where
    from .transformer_rank import _Rank

Array = Any


def fsdp_tp_rank(rk: _Rank, /) -> TransformerPieces:
    """This rank's step: its flat shard of its tp pieces, gathered per unit down its column."""
    comm, n, r, xp, c, t = rk.comm, rk.n, rk.r, rk.xp, rk.config, rk.step.tp
    d, row, col = n // t, r // t, r % t
    rows, cols = mesh_groups(n, t)
    tp = {k: tp_where(k, c, t, col) for k in rk.params}
    local = {k: take(v, tp[k]) for k, v in rk.params.items()}  # this rank's tp pieces
    flat = {k: flat_where(row, d) for k in local}
    wheres = {k: flat[k] if tp[k] is None else ("in", tp[k], flat[k]) for k in local}
    shard = {k: take(v, flat[k]) for k, v in local.items()}  # all this rank keeps
    kv_groups = None
    if c.n_kv_heads % t:  # K < t: the t/K ranks of a row that share a kv head sum its gradient
        per = t // c.n_kv_heads
        kv_groups = [[a * t + kv * per + j for j in range(per)] for a in range(d) for kv in range(c.n_kv_heads)]

    def weights(names: list[str], phase: str) -> dict[str, Array]:
        return {k: xp.reshape(comm.all_gather(shard[k], tensor=k, groups=cols), local[k].shape) for k in names}

    def all_reduce(x: Array, tensor: str) -> Array:
        return comm.all_reduce(x, tensor=tensor, groups=rows)

    grads: dict[str, tuple[Array, Where]] = {}

    def done(names: list[str], g: dict[str, Array]) -> None:
        for k in names:
            if kv_groups is not None and k.endswith((".wk", ".wv")):
                g[k] = comm.all_reduce(g[k], tensor=f"{k} grad", groups=kv_groups)
            part = comm.reduce_scatter(xp.reshape(g.pop(k), (-1,)), tensor=f"{k} grad", groups=cols)
            grads[k] = (part, wheres[k])

    tok, tgt = rk.batch_part(rk.tokens, row, d), rk.batch_part(rk.targets, row, d)
    model = Model(rk.layers, local_config(c, t), rk.step.dtype, xp)
    split = Split(enter_grad=all_reduce, leave=all_reduce) if t > 1 else WHOLE
    loss, _ = rk.walk(weights, tok, tgt, 1.0 / d, split, done, model)
    mine = {k: (shard[k], wheres[k]) for k in rk.params}
    return rk.pieces(loss / n, {k: grads[k] for k in rk.params}, mine)
