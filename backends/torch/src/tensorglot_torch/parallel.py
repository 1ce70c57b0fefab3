"""torch parallel strategies over torch.distributed: see the spec (`tensorglot.parallel`).

Real processes, one per rank (`launch`): gloo on CPU, NCCL when every rank has its own GPU. Each rank
runs the spec's per-rank step over a process group (`collectives`), which logs every collective from
its tensor (logical bytes; gloo's own traffic differs). ``python -m tensorglot_torch.parallel`` runs one
step, under torchrun or on ranks it spawns (`launch.main`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot import parallel as spec
from tensorglot.parallel import StepResult

from ._common import as_float, dtype_name
from .collectives import FAIL_RANK_ENV as FAIL_RANK_ENV
from .collectives import ProcessGroupCollectives, host
from .launch import launch, run_ranks
from .launch import shutdown as shutdown


def _prepare(fn: str, params: Mapping[str, Any], x: Any, dy: Any):
    """The inputs as tensors in x's dtype, on x's device, and the step's shape."""
    ts = {k: as_float(fn, k, v) for k, v in [*params.items(), ("x", x), ("dy", dy)]}
    x_ = ts.pop("x")
    ts = {k: v.to(device=x_.device, dtype=x_.dtype) for k, v in ts.items()}
    dy_ = ts.pop("dy")
    return ts, x_, dy_, spec.mlp_shape(fn, ts, x_, dy_, dtype_name(x_))


def _run(c: spec.StepConfig, ps: dict[str, torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> StepResult:
    return launch(c, {k: host(v) for k, v in {**ps, "x": x, "dy": dy}.items()})  # the ranks get host arrays


step, single_step = spec.parallel_functions(_prepare, _run, spec.one_device_step, host)


def max_world_size() -> int | None:
    return None  # processes: NCCL when every rank has a GPU, gloo otherwise


def _transformer_rank(task: spec.Task, fail: str | None, device: torch.device) -> tuple[Any, list, float]:
    """This rank's part of a transformer step, timed between barriers: its host pieces, log and seconds."""
    import tensorglot

    layers = tensorglot.get_backend("torch").layers
    comm = ProcessGroupCollectives(dist.get_rank(), dist.get_world_size(), fail=fail)
    dist.barrier()
    start = time.perf_counter()
    pieces = spec.transformer_rank(comm, layers, task, lambda a: torch.from_numpy(np.array(a)).to(device))
    comm.wait_sends()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return pieces.map(host), comm.log, time.perf_counter() - start


def _run_transformer(task: spec.Task) -> spec.TransformerStepResult:
    args = (task, os.environ.get(FAIL_RANK_ENV))
    s = task.step
    outputs = run_ranks(s.world_size, s.timeout, f"transformer_step: {s.strategy}", _transformer_rank, args)
    return spec.gather_transformer(task, outputs)


transformer_step = spec.transformer_step_function(host, _run_transformer)


if __name__ == "__main__":
    from tensorglot_torch.launch import main

    sys.exit(main())
