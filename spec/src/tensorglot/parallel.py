"""The parallel namespace: one training step of an L-layer MLP split over n devices, and its cost model.

The model is ``relu(x @ w_in) @ w_out`` per layer (no residual), layer l with ``w_in`` (D, F) and
``w_out`` (F, D), parameters named ``layers.{l}.w_in`` and ``layers.{l}.w_out`` (as in `init_params`).
A step is forward, backward from a given output gradient ``dy`` (so the loss is ``sum(y * dy)``: no
batch mean, and the gradient of a batch split over ranks is the plain sum of the ranks' gradients),
and an SGD update ``w ← w − lr·g``.

Strategies (``STRATEGIES``):
  * ``dp``: the batch split n ways, every gradient all-reduced (in backward order).
  * ``tp`` (Megatron, arXiv:1909.08053): ``w_in`` split by columns, ``w_out`` by rows; per layer one
    all-reduce of the (B, D) output forward and one of the (B, D) input gradient backward.
  * ``fsdp`` (ZeRO-3, arXiv:1910.02054): the batch split n ways and each parameter split on its first
    axis; a parameter is all-gathered just before its forward use and freed, gathered again before its
    backward use, and its gradient reduce-scattered, so each rank keeps and updates 1/n of everything.
  * ``pp`` (GPipe arXiv:1811.06965, 1F1B arXiv:2104.04473): L layers in p = n stages, the batch in m
    microbatches, run by the time table of `pipeline_schedule`; stage i sends each microbatch's
    (B/m, D) activation to i+1 and its gradient back to i−1.
  * ``dp_tp``: a (d, t) mesh, rank = dp_index·t + tp_index; tp inside each row of t ranks on B/d
    samples, then dp across the d rows all-reduces each rank's 1/t gradient shards.

Cost conventions (pinned):
  * "bytes per device" counts what one device **sends** in a step, for ring algorithms
    (Patarasuk & Yuan 2009; the NCCL and gloo rings): for a collective over n devices on a tensor
    of V bytes (the full, unsharded size),
      all-gather (n−1)/n·V,  reduce-scatter (n−1)/n·V,  all-reduce 2(n−1)/n·V,  point-to-point send V.
    These are *logical* bytes, counted from each collective's tensor: gloo's and XLA's internals may
    move data differently, the count is what the algorithm needs.
  * P = 2·L·D·F parameters of ``itemsize`` bytes; communicated tensors have the step's dtype.
  * For pp, each stage's bytes differ (the ends send one way, the middle both); ``bytes_per_device``
    is the busiest rank's and ``bytes_by_rank`` holds them all. The bubble is (p−1)/(m+p−1).

Every backend returns host NumPy arrays in a `StepResult` (bfloat16 widened to float32): gathering
the shards into full arrays happens outside the step and is not counted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import numpy as np

STRATEGIES = ("dp", "tp", "fsdp", "pp", "dp_tp")
#: The capabilities a strategy needs (dp_tp is dp and tp on a 2-D mesh).
STRATEGY_CAPABILITIES = {"dp": ("dp",), "tp": ("tp",), "fsdp": ("fsdp",), "pp": ("pp",), "dp_tp": ("dp", "tp")}
#: The functions of a backend's ``parallel`` namespace (their signatures are `Parallel`'s).
NAMES = ("step", "single_step", "max_world_size")
SCHEDULES = ("gpipe", "1f1b")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def request_host_devices(backend: str, n: int, /) -> None:
    """Ask JAX for ``n`` CPU devices if it has not started yet (a no-op for other backends or once it has).

    JAX reads ``XLA_FLAGS`` once, when it initialises; GPUs and TPUs are unaffected by the flag.
    """
    import os
    import sys

    flag = "--xla_force_host_platform_device_count"
    if backend == "jax" and "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={n}".strip()


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


# ---------------------------------------------------------------------------------------------
# Pipeline schedules as data


def _stage_order(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which one stage runs its forwards and backwards."""
    m = microbatches
    if kind == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    # 1F1B: p−i−1 warm-up forwards, then one forward and one backward in turn, then the rest backward.
    warmup = min(stages - stage - 1, m)
    order = [("F", j) for j in range(warmup)]
    for k in range(m - warmup):
        order += [("F", warmup + k), ("B", k)]
    return order + [("B", k) for k in range(m - warmup, m)]


def pipeline_schedule(kind: str, stages: int, microbatches: int, /) -> list[tuple[int, int, str, int]]:
    """The pipeline's time table: ``(time_slot, stage, "F" | "B", microbatch)`` sorted by slot, stage.

    Each forward and backward takes one slot. A stage runs its ops in its schedule's order
    (GPipe: every forward, then every backward; 1F1B: p−i−1 warm-up forwards, then alternating), each as
    early as its inputs allow: F(i, j) after F(i−1, j); B(i, j) after B(i+1, j), and on the last stage
    after F(p−1, j). Both take 2(m+p−1) slots, m+p−1 per direction; they differ in the activations held
    (`activations_held`): GPipe m microbatches on every stage, 1F1B min(p−i, m) on stage i.

    >>> pipeline_schedule("gpipe", 2, 2)  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 'F', 0), (1, 0, 'F', 1), (1, 1, 'F', 0), (2, 1, 'F', 1),
     (3, 1, 'B', 0), (4, 0, 'B', 0), (4, 1, 'B', 1), (5, 0, 'B', 1)]
    >>> pipeline_schedule("1f1b", 2, 2)  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 'F', 0), (1, 0, 'F', 1), (1, 1, 'F', 0), (2, 1, 'B', 0),
     (3, 0, 'B', 0), (3, 1, 'F', 1), (4, 1, 'B', 1), (5, 0, 'B', 1)]
    """
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline_schedule: unknown kind {kind!r}, wanted one of {', '.join(SCHEDULES)}")
    for name, value in (("stages", stages), ("microbatches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline_schedule: {name} must be a positive int, got {value!r}")
    p = stages
    orders = [_stage_order(kind, i, p, microbatches) for i in range(p)]
    done: dict[tuple[str, int, int], int] = {}  # (op, stage, microbatch) -> slot
    table: list[tuple[int, int, str, int]] = []
    next_op = [0] * p
    slot = 0
    while any(next_op[i] < len(orders[i]) for i in range(p)):
        for i in range(p):
            if next_op[i] == len(orders[i]):
                continue
            op, j = orders[i][next_op[i]]
            if op == "F":
                needs = [("F", i - 1, j)] if i > 0 else []
            else:
                needs = [("B", i + 1, j)] if i < p - 1 else [("F", i, j)]
            if all(done.get(d, slot) < slot for d in needs):
                table.append((slot, i, op, j))
                next_op[i] += 1
        for t, i, op, j in table:
            if t == slot:
                done[(op, i, j)] = slot
        slot += 1
    return table


def schedule_slots(schedule: Sequence[tuple[int, int, str, int]], /) -> int:
    """How many time slots a schedule takes.

    >>> schedule_slots(pipeline_schedule("gpipe", 4, 8))   # 2(m+p−1)
    22
    """
    return 1 + max(t for t, _, _, _ in schedule)


def activations_held(schedule: Sequence[tuple[int, int, str, int]], stages: int, /) -> list[int]:
    """The peak number of microbatches whose activations each stage holds: from its F to its B.

    >>> activations_held(pipeline_schedule("gpipe", 4, 8), 4)
    [8, 8, 8, 8]
    >>> activations_held(pipeline_schedule("1f1b", 4, 8), 4)   # min(p − i, m)
    [4, 3, 2, 1]
    """
    held, peak = [0] * stages, [0] * stages
    for _, i, op, _ in sorted(schedule, key=lambda e: (e[0], e[2] == "B")):
        held[i] += 1 if op == "F" else -1
        peak[i] = max(peak[i], held[i])
    return peak


# ---------------------------------------------------------------------------------------------
# The cost model


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
    bytes_per_device: int  # the busiest rank's
    param_bytes_per_rank: int
    bubble: float = 0.0
    bytes_by_rank: tuple[int, ...] = ()
    notes: dict[str, int] = field(default_factory=dict)


def default_tp_size(world_size: int, /) -> int:
    """dp_tp's tensor-parallel size when none is given: the largest divisor of n that is <= √n.

    >>> [default_tp_size(n) for n in (1, 2, 4, 6, 8)]
    [1, 1, 2, 2, 2]
    """
    return max(t for t in range(1, math.isqrt(world_size) + 1) if world_size % t == 0)


def check_step(
    strategy: str,
    shape: MLPShape,
    world_size: int,
    *,
    microbatches: int = 1,
    tp_size: int | None = None,
    schedule: str = "gpipe",
) -> None:
    """Raise ValueError for a strategy that cannot run on this shape: before any process starts.

    >>> check_step("fsdp", MLPShape(layers=2, batch=6, d_model=4, d_ff=8), 4)
    Traceback (most recent call last):
    ...
    ValueError: parallel: fsdp needs batch = 6 divisible by world_size = 4
    """
    fn = "parallel"
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: unknown strategy {strategy!r}, wanted one of {', '.join(STRATEGIES)}")
    n = world_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: world_size must be a positive int, got {n!r}")

    def divides(what: str, size: int, by: int, by_name: str = "world_size") -> None:
        if size % by:
            raise ValueError(f"{fn}: {strategy} needs {what} = {size} divisible by {by_name} = {by}")

    if strategy in ("dp", "fsdp"):
        divides("batch", shape.batch, n)
    if strategy == "fsdp":
        divides("d_model (w_in's first axis)", shape.d_model, n)
        divides("d_ff (w_out's first axis)", shape.d_ff, n)
    if strategy == "tp":
        divides("d_ff", shape.d_ff, n)
    if strategy == "pp":
        divides("layers", shape.layers, n)
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"{fn}: microbatches must be a positive int, got {microbatches!r}")
        divides("batch", shape.batch, microbatches, "microbatches")
        if schedule not in SCHEDULES:
            raise ValueError(f"{fn}: unknown schedule {schedule!r}, wanted one of {', '.join(SCHEDULES)}")
    if strategy == "dp_tp":
        t = default_tp_size(n) if tp_size is None else tp_size
        if isinstance(t, bool) or not isinstance(t, int) or t < 1 or n % t:
            raise ValueError(f"{fn}: dp_tp needs tp_size dividing world_size = {n}, got {tp_size!r}")
        divides("batch", shape.batch, n // t, "the dp size")
        divides("d_ff", shape.d_ff, t, "tp_size")


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


# ---------------------------------------------------------------------------------------------
# The strategy protocol


def param_names(layers: int, /) -> list[str]:
    """``layers.{l}.w_in``, ``layers.{l}.w_out`` for each layer, in order.

    >>> param_names(2)
    ['layers.0.w_in', 'layers.0.w_out', 'layers.1.w_in', 'layers.1.w_out']
    """
    return [f"layers.{l}.{w}" for l in range(layers) for w in ("w_in", "w_out")]


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
        for name, want in ((f"layers.{l}.w_in", (D, F)), (f"layers.{l}.w_out", (F, D))):
            if tuple(params[name].shape) != want:
                raise ValueError(
                    f"{fn}: {name} has shape {tuple(params[name].shape)}, wanted (D, F) = {want}"
                    if name.endswith("w_in")
                    else f"{fn}: {name} has shape {tuple(params[name].shape)}, wanted (F, D) = {want}"
                )
    if tuple(dy.shape) != (B, D):
        raise ValueError(f"{fn}: dy has shape {tuple(dy.shape)}, wanted the output's (B, D) = {(B, D)}")
    return MLPShape(layers=layers, batch=B, d_model=D, d_ff=F, dtype=dtype)


@dataclass
class StepResult:
    """What one training step returns, on the host, shards gathered to full shape.

    ``collectives`` are the busiest rank's, in issue order, as measured by the backend (kind, the full
    tensor's bytes V, group size); ``bytes_by_rank`` is what each rank sent.
    """

    strategy: str
    world_size: int
    output: np.ndarray  # (B, D)
    input_grad: np.ndarray  # (B, D), dL/dx
    grads: dict[str, np.ndarray]  # full shape, by parameter name
    params: dict[str, np.ndarray]  # after the SGD update
    collectives: tuple[Collective, ...]
    bytes_by_rank: tuple[int, ...]
    param_bytes_per_rank: int
    seconds: float = 0.0  # wall time of the step itself (no launch, no gathering)

    @property
    def bytes_per_device(self) -> int:
        return max(self.bytes_by_rank)


@runtime_checkable
class Parallel(Protocol):
    """What a backend's ``parallel`` namespace provides."""

    def step(
        self,
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
        """One training step of the MLP under ``strategy`` on ``world_size`` devices.

        Args:
          params: ``layers.{l}.w_in`` (D, F) and ``layers.{l}.w_out`` (F, D), L >= 1.
          x: (B, D) input; dy: (B, D) gradient of the loss with respect to the output. The step's dtype is
            x's (params are cast to it); float32 and bfloat16 on every backend that has them.
          strategy: one of ``STRATEGIES``; microbatches and schedule are pp's, tp_size dp_tp's.
          timeout: seconds before a backend that starts processes kills them all and raises.

        Validates with `check_step` before any process starts or any compile.
        """
        ...

    def single_step(self, params: Mapping[str, Any], x: Any, dy: Any, /, *, lr: float = 0.1) -> StepResult:
        """The same step on one device, no collectives: what every strategy must equal."""
        ...

    def max_world_size(self) -> int | None:
        """The most devices a step can use here (JAX: its device count), None when processes are the limit."""
        ...


def median_seconds(run: Callable[[], StepResult], /, *, repeats: int = 5, warmup: int = 1) -> float:
    """The median of ``run().seconds`` (the step's own time, no launch, no conversion) after ``warmup`` runs."""
    for _ in range(warmup):
        run()
    return statistics.median(run().seconds for _ in range(repeats))
