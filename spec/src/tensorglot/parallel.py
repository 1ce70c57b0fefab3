"""The parallel namespace's cost model: bytes per device and parameter memory per rank for one
training step of an L-layer MLP (``relu(x @ w_in) @ w_out`` per layer), for each strategy.

Conventions (pinned):
  * "bytes per device" counts what one device **sends** in a step, for ring algorithms
    (Patarasuk & Yuan 2009; the NCCL and gloo rings): for a collective over n devices on a tensor
    of V bytes (the full, unsharded size),
      all-gather (n−1)/n·V,  reduce-scatter (n−1)/n·V,  all-reduce 2(n−1)/n·V,  point-to-point send V.
  * A step is forward, backward and an SGD update on a batch x (B, D); layer l has w_in (D, F) and
    w_out (F, D). P = 2·L·D·F parameters of ``itemsize`` bytes.
  * dp: batch split n ways, one all-reduce of each gradient (2L of them).
  * tp (Megatron, arXiv:1909.08053): w_in split by columns, w_out by rows; per layer one all-reduce of
    the (B, D) output forward and one of the (B, D) input gradient backward.
  * fsdp (ZeRO-3, arXiv:1910.02054): batch split n ways; each parameter all-gathered before its
    forward use, gathered again before its backward use, its gradient reduce-scattered.
  * pp (GPipe arXiv:1811.06965, 1F1B arXiv:2104.04473): L layers in p stages, m microbatches; stage i
    sends each microbatch's (B/m, D) activation forward to i+1 and its gradient back to i−1. Bytes per
    device is the busiest stage's. The bubble is (p−1)/(m+p−1) of the schedule.
  * dp×tp: a (d, t) mesh; tp inside each row on B/d samples, dp across rows on the 1/t gradient shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

STRATEGIES = ("dp", "tp", "fsdp", "pp", "dp_tp")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _exact(value: Fraction) -> int:
    if value.denominator != 1:
        raise ValueError(f"cost model: {value} bytes is not a whole number; the shards do not divide evenly")
    return int(value)


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


def _check_group(fn: str, v: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"{fn}: group size n must be >= 1, got {n}")
    if v < 0:
        raise ValueError(f"{fn}: v must be >= 0 bytes, got {v}")


def pipeline_bubble(stages: int, microbatches: int, /) -> float:
    """The idle fraction of a GPipe or 1F1B schedule: (p−1)/(m+p−1).

    >>> pipeline_bubble(4, 4)
    0.42857142857142855
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"pipeline_bubble: stages and microbatches must be >= 1, got {stages}, {microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


@dataclass(frozen=True)
class MLPShape:
    """The MLP one training step runs on."""

    layers: int
    batch: int
    d_model: int
    d_ff: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("layers", "batch", "d_model", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPShape: {name} must be a positive int, got {value!r}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"MLPShape: dtype must be one of {', '.join(ITEMSIZE)}, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def layer_param_bytes(self) -> int:
        return 2 * self.d_model * self.d_ff * self.itemsize

    @property
    def param_bytes(self) -> int:
        return self.layers * self.layer_param_bytes

    @property
    def activation_bytes(self) -> int:
        """One (B, D) activation."""
        return self.batch * self.d_model * self.itemsize


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
    bytes_per_device: int
    param_bytes_per_rank: int
    bubble: float = 0.0
    notes: dict[str, int] = field(default_factory=dict)


def check_step(
    strategy: str, shape: MLPShape, world_size: int, *, microbatches: int = 1, tp_size: int | None = None
) -> None:
    """Raise ValueError for a strategy that cannot run on this shape: before any process starts."""
    fn = "parallel"
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: unknown strategy {strategy!r}, wanted one of {', '.join(STRATEGIES)}")
    n = world_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: world_size must be a positive int, got {n!r}")

    def divides(what: str, size: int, by: int) -> None:
        if size % by:
            raise ValueError(f"{fn}: {strategy} needs {what} = {size} divisible by {by}")

    if strategy in ("dp", "fsdp"):
        divides("batch", shape.batch, n)
    if strategy == "fsdp":
        divides("d_model (w_in's first axis)", shape.d_model, n)
        divides("d_ff (w_out's first axis)", shape.d_ff, n)
    if strategy == "tp":
        divides("d_ff", shape.d_ff, n)
    if strategy == "pp":
        divides("layers", shape.layers, n)
        if microbatches < 1:
            raise ValueError(f"{fn}: microbatches must be >= 1, got {microbatches}")
        divides("batch", shape.batch, microbatches)
    if strategy == "dp_tp":
        t = tp_size or 0
        if t < 1 or n % t:
            raise ValueError(f"{fn}: dp_tp needs tp_size dividing world_size = {n}, got {tp_size!r}")
        divides("batch", shape.batch, n // t)
        divides("d_ff", shape.d_ff, t)


def step_cost(
    strategy: str, shape: MLPShape, world_size: int, *, microbatches: int = 1, tp_size: int | None = None
) -> StepCost:
    """What one training step of ``strategy`` costs each device, by the conventions above.

    >>> s = MLPShape(layers=2, batch=8, d_model=4, d_ff=8)   # P = 2·2·4·8 = 128 params, 512 bytes
    >>> step_cost("dp", s, 4).bytes_per_device               # 2(n−1)/n · 512
    768
    >>> step_cost("fsdp", s, 4).param_bytes_per_rank
    128
    """
    check_step(strategy, shape, world_size, microbatches=microbatches, tp_size=tp_size)
    n, L = world_size, shape.layers
    e = shape.itemsize
    w_in_bytes = shape.d_model * shape.d_ff * e
    w_out_bytes = w_in_bytes
    ops: list[Collective] = []
    bubble = 0.0
    if strategy == "dp":
        for l in range(L):
            ops.append(Collective("all_reduce", f"layers.{l}.w_out grad", w_out_bytes, n))
            ops.append(Collective("all_reduce", f"layers.{l}.w_in grad", w_in_bytes, n))
        param = shape.param_bytes
    elif strategy == "tp":
        act = shape.activation_bytes
        for l in range(L):
            ops.append(Collective("all_reduce", f"layers.{l} output", act, n))
        for l in reversed(range(L)):
            ops.append(Collective("all_reduce", f"layers.{l} input grad", act, n))
        param = _exact(Fraction(shape.param_bytes, n))
    elif strategy == "fsdp":
        for l in range(L):
            ops.append(Collective("all_gather", f"layers.{l}.w_in", w_in_bytes, n))
            ops.append(Collective("all_gather", f"layers.{l}.w_out", w_out_bytes, n))
        for l in reversed(range(L)):
            ops.append(Collective("all_gather", f"layers.{l}.w_out", w_out_bytes, n))
            ops.append(Collective("reduce_scatter", f"layers.{l}.w_out grad", w_out_bytes, n))
            ops.append(Collective("all_gather", f"layers.{l}.w_in", w_in_bytes, n))
            ops.append(Collective("reduce_scatter", f"layers.{l}.w_in grad", w_in_bytes, n))
        param = _exact(Fraction(shape.param_bytes, n))
    elif strategy == "pp":
        m = microbatches
        micro = _exact(Fraction(shape.activation_bytes, m))
        # A middle stage sends every microbatch forward and every gradient backward; with p = 1 nothing.
        if n > 1:
            for i in range(m):
                ops.append(Collective("send", f"microbatch {i} activation", micro, 2))
            if n > 2:
                for i in range(m):
                    ops.append(Collective("send", f"microbatch {i} grad", micro, 2))
        param = _exact(Fraction(shape.param_bytes, n))
        bubble = pipeline_bubble(n, m)
    else:  # dp_tp
        t = tp_size or 1
        d = n // t
        act = _exact(Fraction(shape.activation_bytes, d))
        for l in range(L):
            ops.append(Collective("all_reduce", f"layers.{l} output", act, t))
        for l in reversed(range(L)):
            ops.append(Collective("all_reduce", f"layers.{l} input grad", act, t))
        for l in range(L):
            ops.append(Collective("all_reduce", f"layers.{l}.w_out grad shard", _exact(Fraction(w_out_bytes, t)), d))
            ops.append(Collective("all_reduce", f"layers.{l}.w_in grad shard", _exact(Fraction(w_in_bytes, t)), d))
        param = _exact(Fraction(shape.param_bytes, t))
    total = sum(c.bytes_per_device for c in ops)
    return StepCost(strategy, n, tuple(ops), total, param, bubble)
