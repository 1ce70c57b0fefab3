"""How a transformer step splits its parameters and ranks: a rank's piece of a parameter (`Where`,
`take`), flat shards (zero, fsdp), Megatron's tensor-parallel pieces, pipeline stages, and the row and
column groups of a mesh."""

from __future__ import annotations

import numbers
from typing import Any

from array_api_compat import array_namespace

from ..params import param_shapes
from .schedules import pipeline_schedule
from .transformer import Where
from .transformer_blocks import block_names
from .transformer_schedules import interleaved_schedule

Array = Any


def take(x: Array, where: Where, /) -> Array:
    """The piece of ``x`` at ``where``: part i of k equal parts. An i that is not an int (a rank JAX knows
    only when it runs, `lax.axis_index` inside `shard_map`) selects by index instead of by slice."""
    if where is None:
        return x
    if where[0] == "in":  # a piece of a piece
        return take(take(x, where[1]), where[2])
    axis, i, k = where
    xp = array_namespace(x)
    if axis == "flat":
        x, axis = xp.reshape(x, (-1,)), 0
    size = x.shape[axis] // k
    if not isinstance(i, numbers.Integral):
        return xp.take(x, i * size + xp.arange(size), axis=axis)
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(i * size, (i + 1) * size)
    return x[tuple(index)]


def flat_where(rank: int, n: int, /) -> Where:
    """Rank ``rank``'s 1/n of a flattened array."""
    return ("flat", rank, n)


def tp_where(name: str, config: Any, t: int, rank: int, /) -> Where:
    """Rank ``rank``'s piece of ``name`` among t tensor-parallel ranks (None: replicated)."""
    kind = name.rsplit(".", 1)[-1]
    if kind in ("wq", "wo"):
        return (1 if kind == "wq" else 0, rank, t)
    if kind in ("wk", "wv"):
        K = config.n_kv_heads
        if K % t == 0:
            return (1, rank, t)
        return (1, rank * K // t, K)  # the kv head this rank's query heads read, replicated on t/K ranks
    if kind in ("w_in", "w_gate", "w_up", "w_out", "w_down"):
        return (0 if kind in ("w_out", "w_down") else 1, rank, t)
    return None


def mesh_groups(n: int, inner: int) -> tuple[list[list[int]], list[list[int]]]:
    """A (d, inner) mesh's rows (one tp group or pipeline each) and columns (the d replicas of a rank)."""
    d = n // inner
    rows = [[a * inner + k for k in range(inner)] for a in range(d)]
    return rows, [[a * inner + k for a in range(d)] for k in range(inner)]


def stage_names(config: Any, stage: int, stages: int, /) -> list[str]:
    """What pipeline stage ``stage`` of ``stages`` holds: its L/p blocks, the embedding on the first and
    the head on the last."""
    per = config.n_layers // stages
    names = [k for b in range(stage * per, (stage + 1) * per) for k in block_names(config, b)]
    return (["embed"] if stage == 0 else []) + names + (["norm", "lm_head"] if stage == stages - 1 else [])


def device_names(config: Any, device: int, devices: int, chunks: int, /) -> list[str]:
    """What pipeline device ``device`` holds: the stages ch·p + device of its ``chunks`` chunks, in the
    parameters' order."""
    held = {k for ch in range(chunks) for k in stage_names(config, ch * devices + device, devices * chunks)}
    return [k for k in param_shapes(config) if k in held]


def pipeline_table(schedule: str, stages: int, microbatches: int, chunks: int, /) -> tuple[int, list]:
    """(chunks per device, the rows ``(slot, device, op, microbatch, chunk)`` the devices run): the
    interleaved table, or `pipeline_schedule`'s with chunk 0."""
    if schedule == "interleaved":
        return chunks, interleaved_schedule(stages, microbatches, chunks)
    return 1, [(*row, 0) for row in pipeline_schedule(schedule, stages, microbatches)]
