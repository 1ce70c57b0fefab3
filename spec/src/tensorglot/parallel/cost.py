"""The communication cost model: the bytes each device sends in one step of each strategy.

"Bytes per device" counts what one device **sends**, for ring algorithms (Patarasuk & Yuan 2009; the
NCCL and gloo rings): for a collective over n devices on a tensor of V bytes (the full, unsharded size),
all-gather (n−1)/n·V, reduce-scatter (n−1)/n·V, all-reduce 2(n−1)/n·V, point-to-point send V. These are
*logical* bytes, counted from each collective's tensor: gloo's and XLA's internals may move data
differently, the count is what the algorithm needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from .schedules import pipeline_bubble, pipeline_schedule
from .step import MLPShape, check_step, default_tp_size


def _exact(value: Fraction) -> int:
    if value.denominator != 1:
        raise ValueError(f"cost model: {value} bytes is not a whole number; the shards do not divide evenly")
    return int(value)


def _check_group(fn: str, v: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"{fn}: group size n must be >= 1, got {n}")
    if v < 0:
        raise ValueError(f"{fn}: v must be >= 0 bytes, got {v}")


def ring_all_gather_bytes(v: int, n: int, /) -> int:
    """Bytes one device sends to all-gather a tensor of ``v`` bytes over ``n`` devices: (n−1)/n·v.

    >>> ring_all_gather_bytes(1024, 4)
    768
    """
    _check_group("ring_all_gather_bytes", v, n)
    return _exact(Fraction(v * (n - 1), n))


def ring_reduce_scatter_bytes(v: int, n: int, /) -> int:
    """Bytes one device sends to reduce-scatter ``v`` bytes over ``n`` devices: (n−1)/n·v.

    >>> ring_reduce_scatter_bytes(1024, 4)
    768
    """
    _check_group("ring_reduce_scatter_bytes", v, n)
    return _exact(Fraction(v * (n - 1), n))


def ring_all_reduce_bytes(v: int, n: int, /) -> int:
    """Bytes one device sends to all-reduce ``v`` bytes: a reduce-scatter then an all-gather, 2(n−1)/n·v.

    >>> ring_all_reduce_bytes(1024, 4)
    1536
    """
    _check_group("ring_all_reduce_bytes", v, n)
    return _exact(Fraction(2 * v * (n - 1), n))


def send_bytes(v: int, /) -> int:
    """A point-to-point send moves the tensor once.

    >>> send_bytes(100)
    100
    """
    if v < 0:
        raise ValueError(f"send_bytes: v must be >= 0, got {v}")
    return v


COLLECTIVE_BYTES = {
    "all_gather": ring_all_gather_bytes,
    "reduce_scatter": ring_reduce_scatter_bytes,
    "all_reduce": ring_all_reduce_bytes,
}


@dataclass(frozen=True)
class Collective:
    """One collective a rank takes part in: ``size_bytes`` is the full tensor's size V."""

    kind: str  # all_reduce | all_gather | reduce_scatter | send
    tensor: str
    size_bytes: int
    group_size: int

    @property
    def bytes_per_device(self) -> int:
        if self.kind == "send":
            return send_bytes(self.size_bytes)
        return COLLECTIVE_BYTES[self.kind](self.size_bytes, self.group_size)


@dataclass(frozen=True)
class StepCost:
    strategy: str
    world_size: int
    collectives: tuple[Collective, ...]  # those of the busiest rank, in issue order
    bytes_per_device: int  # the busiest rank's
    param_bytes_per_rank: int
    bubble: float = 0.0
    bytes_by_rank: tuple[int, ...] = ()
    notes: dict[str, int] = field(default_factory=dict)


def step_cost(
    strategy: str,
    shape: MLPShape,
    world_size: int,
    *,
    microbatches: int = 1,
    tp_size: int | None = None,
    schedule: str = "gpipe",
) -> StepCost:
    """What one training step of ``strategy`` costs each device, by the conventions above.

    P = 2·L·D·F parameters of ``itemsize`` bytes; communicated tensors have the step's dtype. For pp each
    stage's bytes differ (the ends send one way, the middle both): ``bytes_per_device`` is the busiest
    rank's and ``bytes_by_rank`` holds them all; the bubble is (p−1)/(m+p−1).

    >>> s = MLPShape(layers=2, batch=8, d_model=4, d_ff=8)   # P = 2·2·4·8 = 128 params, 512 bytes
    >>> step_cost("dp", s, 4).bytes_per_device               # 2(n−1)/n · 512
    768
    >>> step_cost("fsdp", s, 4).param_bytes_per_rank
    128
    >>> step_cost("pp", s, 2, microbatches=4).bytes_by_rank  # 4 microbatches of 2·4·4 bytes, each way
    (128, 128)
    """
    check_step(strategy, shape, world_size, microbatches=microbatches, tp_size=tp_size, schedule=schedule)
    n, L = world_size, shape.layers
    w_bytes = shape.d_model * shape.d_ff * shape.itemsize  # w_in and w_out are the same size
    per_rank: list[list[Collective]] = [[] for _ in range(n)]

    def everyone(c: Collective) -> None:
        for ops in per_rank:
            ops.append(c)

    bubble = 0.0
    if strategy == "dp":
        for l in reversed(range(L)):
            everyone(Collective("all_reduce", f"layers.{l}.w_out grad", w_bytes, n))
            everyone(Collective("all_reduce", f"layers.{l}.w_in grad", w_bytes, n))
        param = shape.param_bytes
    elif strategy == "tp":
        act = shape.activation_bytes
        for l in range(L):
            everyone(Collective("all_reduce", f"layers.{l} output", act, n))
        for l in reversed(range(L)):
            everyone(Collective("all_reduce", f"layers.{l} input grad", act, n))
        param = _exact(Fraction(shape.param_bytes, n))
    elif strategy == "fsdp":
        for l in range(L):
            everyone(Collective("all_gather", f"layers.{l}.w_in", w_bytes, n))
            everyone(Collective("all_gather", f"layers.{l}.w_out", w_bytes, n))
        for l in reversed(range(L)):
            everyone(Collective("all_gather", f"layers.{l}.w_out", w_bytes, n))
            everyone(Collective("reduce_scatter", f"layers.{l}.w_out grad", w_bytes, n))
            everyone(Collective("all_gather", f"layers.{l}.w_in", w_bytes, n))
            everyone(Collective("reduce_scatter", f"layers.{l}.w_in grad", w_bytes, n))
        param = _exact(Fraction(shape.param_bytes, n))
    elif strategy == "pp":
        m = microbatches
        micro = _exact(Fraction(shape.activation_bytes, m))
        for _, i, op, j in pipeline_schedule(schedule, n, m):
            if op == "F" and i < n - 1:
                per_rank[i].append(Collective("send", f"microbatch {j} activation", micro, 2))
            if op == "B" and i > 0:
                per_rank[i].append(Collective("send", f"microbatch {j} grad", micro, 2))
        param = _exact(Fraction(shape.param_bytes, n))
        bubble = pipeline_bubble(n, m)
    else:  # dp_tp
        t = default_tp_size(n) if tp_size is None else tp_size
        d = n // t
        act = _exact(Fraction(shape.activation_bytes, d))
        shard = _exact(Fraction(w_bytes, t))
        for l in range(L):
            everyone(Collective("all_reduce", f"layers.{l} output", act, t))
        for l in reversed(range(L)):
            everyone(Collective("all_reduce", f"layers.{l} input grad", act, t))
        for l in reversed(range(L)):
            everyone(Collective("all_reduce", f"layers.{l}.w_out grad shard", shard, d))
            everyone(Collective("all_reduce", f"layers.{l}.w_in grad shard", shard, d))
        param = _exact(Fraction(shape.param_bytes, t))
    by_rank = tuple(sum(c.bytes_per_device for c in ops) for ops in per_rank)
    busiest = max(range(n), key=lambda r: by_rank[r])
    return StepCost(strategy, n, tuple(per_rank[busiest]), by_rank[busiest], param, bubble, by_rank)
