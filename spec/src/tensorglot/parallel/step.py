"""What a parallel step is: its strategies, shape and options, the checks before it runs, what it returns,
and the `Parallel` protocol a backend's ``parallel`` namespace implements.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .schedules import SCHEDULES

if TYPE_CHECKING:
    from .cost import Collective

STRATEGIES = ("dp", "tp", "fsdp", "pp", "dp_tp")
#: The capabilities a strategy needs (dp_tp is dp and tp on a 2-D mesh).
STRATEGY_CAPABILITIES = {"dp": ("dp",), "tp": ("tp",), "fsdp": ("fsdp",), "pp": ("pp",), "dp_tp": ("dp", "tp")}
#: The functions of a backend's ``parallel`` namespace (their signatures are `Parallel`'s).
NAMES = ("step", "single_step", "max_world_size")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


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


@dataclass(frozen=True)
class StepConfig:
    """A checked step's options (`step_config`): what every rank is told."""

    strategy: str
    world_size: int
    dtype: str  # the step's: every stored and communicated tensor has it
    lr: float
    microbatches: int
    schedule: str
    tp_size: int | None
    timeout: float

    @property
    def tp(self) -> int:
        """The tensor-parallel size: n for tp, tp_size (or its default) for dp_tp, 1 for the others."""
        if self.strategy == "tp":
            return self.world_size
        if self.strategy == "dp_tp":
            return default_tp_size(self.world_size) if self.tp_size is None else self.tp_size
        return 1


def step_config(
    shape: MLPShape,
    /,
    *,
    strategy: str,
    world_size: int,
    lr: float,
    microbatches: int,
    schedule: str,
    tp_size: int | None,
    timeout: float,
) -> StepConfig:
    """`check_step`, and a timeout that is a positive, finite number of seconds: the `StepConfig` of a valid step."""
    check_step(strategy, shape, world_size, microbatches=microbatches, tp_size=tp_size, schedule=schedule)
    check_timeout("parallel", timeout)
    return StepConfig(strategy, world_size, shape.dtype, lr, microbatches, schedule, tp_size, float(timeout))


def check_timeout(fn: str, timeout: Any, /) -> None:
    """Raise ValueError unless ``timeout`` is a positive, finite number of seconds (a zero one would
    declare every healthy rank dead; an infinite one is no deadline, and overflows the clocks).

    >>> check_timeout("parallel", float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: parallel: timeout must be a positive number of seconds, got inf
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
        raise ValueError(f"{fn}: timeout must be a positive number of seconds, got {timeout!r}")


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


def step_result(
    config: StepConfig,
    output: np.ndarray,
    input_grad: np.ndarray,
    grads: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    logs: Sequence[Sequence[Collective]],
    param_bytes_per_rank: int,
    seconds: float,
) -> StepResult:
    """A `StepResult` from every rank's log of collectives: the busiest rank's become ``collectives``."""
    by_rank = tuple(sum(c.bytes_per_device for c in log) for log in logs)
    busiest = max(range(len(logs)), key=by_rank.__getitem__)
    return StepResult(
        config.strategy,
        config.world_size,
        output,
        input_grad,
        grads,
        params,
        tuple(logs[busiest]),
        by_rank,
        param_bytes_per_rank,
        seconds,
    )


def single_result(
    shape: MLPShape,
    output: np.ndarray,
    input_grad: np.ndarray,
    grads: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    seconds: float,
) -> StepResult:
    """The `StepResult` of the one-device step: no collectives, every parameter on the one device."""
    return StepResult("single", 1, output, input_grad, grads, params, (), (0,), shape.param_bytes, seconds)


def max_abs_difference(got: StepResult, want: StepResult, /) -> float:
    """The largest |got − want| over the output, input gradient, gradients and updated parameters."""
    pairs = [(got.output, want.output), (got.input_grad, want.input_grad)]
    pairs += [(got.grads[k], want.grads[k]) for k in want.grads]
    pairs += [(got.params[k], want.params[k]) for k in want.params]
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in pairs)


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
          timeout: seconds the step may take; past it a backend raises TimeoutError naming the strategy
            (and one that starts processes kills them all).

        Validates with `step_config` before any process starts or any compile.
        """
        ...

    def single_step(self, params: Mapping[str, Any], x: Any, dy: Any, /, *, lr: float = 0.1) -> StepResult:
        """The same step on one device, no collectives: what every strategy must equal."""
        ...

    def max_world_size(self) -> int | None:
        """The most devices a step can use here (JAX: its device count), None when processes are the limit."""
        ...


def parallel_functions(
    prepare: Callable[[str, Mapping[str, Any], Any, Any], tuple[dict[str, Any], Any, Any, MLPShape]],
    run: Callable[[StepConfig, dict[str, Any], Any, Any], StepResult],
    one_device: Callable[..., tuple[Any, Any, dict[str, Any], dict[str, Any]]],
    host: Callable[[Any], np.ndarray],
) -> tuple[Callable[..., StepResult], Callable[..., StepResult]]:
    """A backend's `Parallel.step` and `Parallel.single_step`, with the spec's signatures, from its parts.

    ``prepare(fn, params, x, dy)`` gives the inputs as the backend's arrays in x's dtype and their
    `MLPShape`; ``run(config, params, x, dy)`` runs a checked step on ``config.world_size`` devices;
    ``one_device(params, x, dy, lr=)`` the step on one device, returning when it is done (`one_device_step`
    compiled, say); ``host`` brings one array to NumPy (bfloat16 widened to float32).
    """

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
        ps, x, dy, shape = prepare("step", params, x, dy)
        config = step_config(
            shape,
            strategy=strategy,
            world_size=world_size,
            lr=lr,
            microbatches=microbatches,
            schedule=schedule,
            tp_size=tp_size,
            timeout=timeout,
        )
        return run(config, ps, x, dy)

    def single_step(params: Mapping[str, Any], x: Any, dy: Any, /, *, lr: float = 0.1) -> StepResult:
        ps, x, dy, shape = prepare("single_step", params, x, dy)
        start = time.perf_counter()
        y, dx, grads, new = one_device(ps, x, dy, lr=lr)
        seconds = time.perf_counter() - start
        grads, new = {k: host(v) for k, v in grads.items()}, {k: host(v) for k, v in new.items()}
        return single_result(shape, host(y), host(dx), grads, new, seconds)

    step.__doc__, single_step.__doc__ = Parallel.step.__doc__, Parallel.single_step.__doc__
    return step, single_step


def median_seconds(run: Callable[[], StepResult], /, *, repeats: int = 5, warmup: int = 1) -> float:
    """The median of ``run().seconds`` (the step's own time, no launch, no conversion) after ``warmup`` runs."""
    for _ in range(warmup):
        run()
    return statistics.median(run().seconds for _ in range(repeats))
