"""Sharding costs from the spec's cost model (`tensorglot.parallel.step_cost`): bytes each device sends
in one training step and parameter memory per device, for dp, tp, fsdp and pp against world size."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, NullFormatter

from tensorglot import parallel

from . import style

MEASURED: frozenset[str] = frozenset()
SHAPE = parallel.MLPShape(layers=16, batch=512, d_model=1024, d_ff=4096, dtype="bfloat16")
WORLD_SIZES = (1, 2, 4, 8, 16)
STRATEGIES = ("dp", "tp", "fsdp", "pp")
MICROBATCHES = 8


def data(backend: Any) -> dict[str, Any]:
    bytes_per_device: dict[str, np.ndarray] = {}
    param_bytes: dict[str, np.ndarray] = {}
    for strategy in STRATEGIES:
        costs = [parallel.step_cost(strategy, SHAPE, n, microbatches=MICROBATCHES) for n in WORLD_SIZES]
        bytes_per_device[strategy] = np.array([c.bytes_per_device for c in costs], np.float64)
        param_bytes[strategy] = np.array([c.param_bytes_per_rank for c in costs], np.float64)
    return {
        "world_sizes": np.array(WORLD_SIZES),
        "bytes_per_device": bytes_per_device,
        "param_bytes_per_rank": param_bytes,
        "shape": SHAPE,
        "microbatches": MICROBATCHES,
    }


def draw(d: dict[str, Any]) -> Any:
    colors = dict(zip(STRATEGIES, ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")))
    markers = dict(zip(STRATEGIES, ("o", "s", "^", "D")))
    sizes = dict(zip(STRATEGIES, (6, 11, 8, 4.5)))  # tp, fsdp and pp hold the same P/n: nested markers
    shape, n = d["shape"], d["world_sizes"]
    mib = 2**20
    with style.context():
        fig, (ax_c, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
        for strategy in STRATEGIES:
            comm = d["bytes_per_device"][strategy][1:] / mib  # world size 1 sends nothing: off a log axis
            ax_c.plot(n[1:], comm, "-" + markers[strategy], color=colors[strategy], label=strategy)
            ax_m.plot(
                n,
                d["param_bytes_per_rank"][strategy] / mib,
                "-" + markers[strategy],
                color=colors[strategy],
                label=strategy,
                ms=sizes[strategy],
                lw=1.2,
            )
        for ax, ticks in ((ax_c, n[1:]), (ax_m, n)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(v) for v in ticks])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("world size n (devices)")
            ax.legend()
        ax_c.set_title("Bytes each device sends per training step")
        ax_c.set_ylabel("bytes per device per step (MiB)")
        ax_m.set_yticks(np.unique(np.concatenate(list(d["param_bytes_per_rank"].values()))) / mib)
        ax_m.set_title("Parameter memory per device (tp, fsdp, pp overlap: P/n)")
        ax_m.set_ylabel("parameter bytes per device (MiB)")
        fig.suptitle(
            f"Sharding one training step of an MLP (spec cost model, ring collectives)\n"
            f"{shape.layers} layers, D = {shape.d_model}, F = {shape.d_ff}, batch {shape.batch}, {shape.dtype}; "
            f"pp: {d['microbatches']} microbatches, busiest stage"
        )
    return fig
