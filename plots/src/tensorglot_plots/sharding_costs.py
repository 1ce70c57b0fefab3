"""Sharding costs from the spec's cost model (`tensorglot.parallel.step_cost`): bytes each device sends
in one training step and parameter memory per device, for dp, tp, fsdp and pp against world size —
and, on a backend that declares the strategies, the bytes its `parallel.step` measured on a small MLP
beside what the model says for that MLP."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, NullFormatter

from tensorglot import parallel

from . import style

#: which strategies a backend runs depends on its capabilities, so the measured bytes are not compared
MEASURED = frozenset({"measured", "backend"})
SHAPE = parallel.MLPShape(layers=16, batch=512, d_model=1024, d_ff=4096, dtype="bfloat16")
WORLD_SIZES = (1, 2, 4, 8, 16)
STRATEGIES = ("dp", "tp", "fsdp", "pp")
MICROBATCHES = 8
#: small enough that a real step on ``MEASURED_WORLD`` devices (processes for torch) takes a moment
MEASURED_SHAPE = parallel.MLPShape(layers=4, batch=32, d_model=64, d_ff=256, dtype="float32")
MEASURED_WORLD, MEASURED_MICROBATCHES = 4, 4


def measured_bytes(backend: Any) -> dict[str, tuple[int, int]]:
    """strategy → (bytes per device measured by ``backend.parallel.step``, the model's) on MEASURED_SHAPE."""
    runnable = [s for s in STRATEGIES if s in backend.capabilities]
    devices = backend.parallel.max_world_size() if runnable else None
    if not runnable or (devices is not None and devices < MEASURED_WORLD):
        return {}  # e.g. JAX on a CPU without --xla_force_host_platform_device_count: the model alone
    params, x, dy = parallel.init_mlp(MEASURED_SHAPE, seed=style.SEED)
    params = {k: backend.asarray(v, "float32") for k, v in params.items()}
    x, dy = backend.asarray(x, "float32"), backend.asarray(dy, "float32")
    out = {}
    for strategy in runnable:
        result = backend.parallel.step(
            params, x, dy, strategy=strategy, world_size=MEASURED_WORLD, microbatches=MEASURED_MICROBATCHES
        )
        model = parallel.step_cost(strategy, MEASURED_SHAPE, MEASURED_WORLD, microbatches=MEASURED_MICROBATCHES)
        out[strategy] = (int(result.bytes_per_device), int(model.bytes_per_device))
    return out


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
        "measured": measured_bytes(backend),
        "backend": backend.name,
    }


def _measured_panel(ax: Any, measured: dict[str, tuple[int, int]], backend: str, colors: dict[str, str]) -> None:
    names = list(measured)
    x = np.arange(len(names))
    kib = 2**10
    ax.bar(
        x,
        [measured[s][0] / kib for s in names],
        color=[colors[s] for s in names],
        width=0.6,
        label=f"measured by {backend}",
    )
    ax.scatter(
        x, [measured[s][1] / kib for s in names], marker="_", s=900, color="k", lw=2.5, zorder=3, label="cost model"
    )
    ax.set_yscale("log")
    ax.set_ylim(top=8 * max(max(v) for v in measured.values()) / kib)  # room for the legend
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(x, names)
    shape = MEASURED_SHAPE
    ax.set_title(
        f"Measured = model, n = {MEASURED_WORLD}\n(L = {shape.layers}, D = {shape.d_model}, "
        f"F = {shape.d_ff}, B = {shape.batch}, float32)",
        fontsize=10,
    )
    ax.set_xlabel("strategy")
    ax.set_ylabel("bytes per device per step (KiB)")
    ax.legend(loc="upper left", ncol=2)


def draw(d: dict[str, Any]) -> Any:
    colors = dict(zip(STRATEGIES, ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")))
    markers = dict(zip(STRATEGIES, ("o", "s", "^", "D")))
    sizes = dict(zip(STRATEGIES, (6, 11, 8, 4.5)))  # tp, fsdp and pp hold the same P/n: nested markers
    shape, n = d["shape"], d["world_sizes"]
    mib = 2**20
    with style.context():
        measured = d["measured"]
        if measured:
            fig, (ax_c, ax_m, ax_x) = plt.subplots(
                1, 3, figsize=(16, 4.8), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 0.75]}
            )
            _measured_panel(ax_x, measured, d["backend"], colors)
        else:
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
