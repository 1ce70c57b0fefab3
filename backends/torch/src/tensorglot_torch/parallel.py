"""torch parallel strategies over torch.distributed: see the spec (`tensorglot.parallel`).

Real processes, one per rank (`launch`): gloo on CPU, NCCL when every rank has its own GPU. Each rank
runs the spec's per-rank step over a process group (`collectives`), which logs every collective from
its tensor (logical bytes; gloo's own traffic differs). ``python -m tensorglot_torch.parallel`` runs one
step, under torchrun or on ranks it spawns (`launch.main`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tensorglot import parallel as spec
from tensorglot.parallel import StepResult

from ._common import DTYPES
from .collectives import FAIL_RANK_ENV as FAIL_RANK_ENV
from .collectives import host
from .launch import launch
from .launch import shutdown as shutdown


def _prepare(fn: str, params: Mapping[str, Any], x: Any, dy: Any) -> tuple[dict[str, np.ndarray], spec.MLPShape]:
    """The inputs as host arrays (they travel to the ranks) and the step's shape, in x's dtype."""
    arrays, dtypes = {}, {}
    for name, a in [*params.items(), ("x", x), ("dy", dy)]:
        is_tensor = isinstance(a, torch.Tensor)
        arrays[name] = host(a) if is_tensor else np.asarray(a)
        dtypes[name] = str(a.dtype).removeprefix("torch.") if is_tensor else str(arrays[name].dtype)
        if not (a.is_floating_point() if is_tensor else arrays[name].dtype.kind == "f"):
            raise TypeError(f"{fn}: {name} has dtype {dtypes[name]}, wanted a floating dtype")
    if dtypes["x"] not in spec.ITEMSIZE:
        raise TypeError(f"{fn}: x has dtype {dtypes['x']}, wanted one of {', '.join(spec.ITEMSIZE)}")
    ps = {k: arrays[k] for k in params}
    return arrays, spec.mlp_shape(fn, ps, arrays["x"], arrays["dy"], dtypes["x"])


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
    arrays, shape = _prepare("step", params, x, dy)
    config = spec.step_config(
        shape,
        strategy=strategy,
        world_size=world_size,
        lr=lr,
        microbatches=microbatches,
        schedule=schedule,
        tp_size=tp_size,
        timeout=timeout,
    )
    return launch(config, arrays)


def max_world_size() -> int | None:
    return None  # processes: NCCL when every rank has a GPU, gloo otherwise


def single_step(params: Mapping[str, Any], x: Any, dy: Any, /, *, lr: float = 0.1) -> StepResult:
    arrays, shape = _prepare("single_step", params, x, dy)
    ts = {k: torch.from_numpy(v).to(DTYPES[shape.dtype]) for k, v in arrays.items()}
    x_, dy_ = ts.pop("x"), ts.pop("dy")
    start = time.perf_counter()
    y, dx, grads, new = spec.one_device_step(ts, x_, dy_, lr=lr)
    seconds = time.perf_counter() - start
    return spec.single_result(shape, host(y), host(dx), _hosts(grads), _hosts(new), seconds)


def _hosts(ts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: host(v) for k, v in ts.items()}


if __name__ == "__main__":
    from tensorglot_torch.launch import main

    sys.exit(main())
