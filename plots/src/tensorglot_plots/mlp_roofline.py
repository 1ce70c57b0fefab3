"""The MLP on a roofline: arithmetic intensity against FLOP/s over batch size, with hardware presets,
this machine's measured roof, and the backend's measured `ops.mlp` points.

Cost model of one forward ``relu(x @ w_in) @ w_out`` with x (B, D), w_in (D, F), w_out (F, D):
FLOPs = 2·B·D·F per matmul, 4·B·D·F in all; bytes = itemsize·(2·D·F weights + B·D in + B·D out
+ 2·B·F for the hidden activation written and read back). Intensity ≈ B/2 FLOP/byte in float32 while
the weights dominate: a small batch is memory-bound on every machine.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style
from ._roofline import PRESETS, MachineRoof, roof

MEASURED = frozenset({"achieved_flops", "machine"})
#: 32 MiB of float32 weights
D_MODEL, D_FF = 1024, 4096
BATCHES = (1, 4, 16, 64, 128)
ITEMSIZE = 4  # float32
REPEATS = 5  # each point is the median of 5 runs after a warm-up


def mlp_flops(batch: int, d_model: int, d_ff: int) -> int:
    return 4 * batch * d_model * d_ff


def mlp_bytes(batch: int, d_model: int, d_ff: int, itemsize: int) -> int:
    return itemsize * (2 * d_model * d_ff + 2 * batch * d_model + 2 * batch * d_ff)


def data(backend: Any) -> dict[str, Any]:
    from tensorglot import bench

    flops = np.array([mlp_flops(b, D_MODEL, D_FF) for b in BATCHES], np.float64)
    nbytes = np.array([mlp_bytes(b, D_MODEL, D_FF, ITEMSIZE) for b in BATCHES], np.float64)
    machine, ctx, achieved = MachineRoof(), bench.Context(backend), []
    for b, f in zip(BATCHES, flops):
        # the bench's mlp row measurement, forward only: the MLP, then its two products alone, alternated
        point, probe_in, probe_out = bench.mlp_times(ctx, b, D_MODEL, D_FF, backward=False, repeats=REPEATS)
        achieved.append(f / float(np.median(point)))
        machine.add_product((b, D_MODEL, D_FF), min(probe_in))
        machine.add_product((b, D_FF, D_MODEL), min(probe_out))
    return {
        "batches": np.array(BATCHES),
        "shape": (D_MODEL, D_FF),
        "flops": flops,
        "bytes": nbytes,
        "intensity": flops / nbytes,
        "achieved_flops": np.array(achieved),
        "machine": machine.result(),
        "presets": PRESETS,
    }


def draw(d: dict[str, Any]) -> Any:
    intensity_axis = np.logspace(-1, 4, 400)
    machine = d["machine"]
    ridge = machine["peak_flops"] / machine["bandwidth"]
    with style.context():
        fig, ax = plt.subplots(figsize=(9.5, 5.6), layout="constrained")
        for (name, (peak, bw)), c in zip(d["presets"].items(), ("#9467bd", "#8c564b", "#17becf")):
            ax.plot(
                intensity_axis,
                roof(peak, bw, intensity_axis),
                color=c,
                lw=1.4,
                label=f"{name}: {peak / 1e12:g} TFLOP/s, {bw / 1e12:g} TB/s (ridge {peak / bw:.0f} FLOP/B)",
            )
            ax.plot(peak / bw, peak, "o", color=c, ms=4)
        ax.plot(
            intensity_axis,
            roof(machine["peak_flops"], machine["bandwidth"], intensity_axis),
            color="k",
            lw=2.2,
            label=f"this machine, float32, best measured: {machine['peak_flops'] / 1e9:.0f} GFLOP/s, "
            f"{machine['bandwidth'] / 1e9:.0f} GB/s",
        )
        ax.plot([ridge, ridge], [1e-3, machine["peak_flops"]], color="k", ls=":", lw=1.2)
        ax.annotate(
            f"critical intensity\n{ridge:.1f} FLOP/byte",
            (ridge, machine["peak_flops"]),
            xytext=(-6, 8),
            textcoords="offset points",
            fontsize=8.5,
            va="bottom",
            ha="right",
        )
        ax.plot(
            d["intensity"],
            d["achieved_flops"],
            "o",
            color="#d62728",
            ms=7,
            zorder=5,
            label=f"ops.mlp measured (median of 5), float32, D = {d['shape'][0]}, F = {d['shape'][1]}",
        )
        for b, x, y in zip(d["batches"], d["intensity"], d["achieved_flops"]):
            ax.annotate(f"B={b}", (x, y), xytext=(5, -11), textcoords="offset points", fontsize=8, color="#d62728")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(intensity_axis[0], intensity_axis[-1])
        ax.set_ylim(min(d["achieved_flops"].min(), machine["bandwidth"] * 0.1) / 3, 3e15)
        ax.set_title("MLP roofline: a small batch is memory-bound on every machine")
        ax.set_xlabel("arithmetic intensity (FLOP/byte)")
        ax.set_ylabel("attainable rate (FLOP/s)")
        ax.legend(loc="upper left", fontsize=7.8)
    return fig
