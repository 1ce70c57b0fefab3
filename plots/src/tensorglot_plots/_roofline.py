"""Shared by the roofline figures: hardware presets and this machine's roof, measured in the run.

A roof is min(peak FLOP/s, bandwidth × intensity). The presets are vendor datasheet numbers (dense,
no sparsity). This machine's roof is the best it showed in the run, from two kinds of probe:
  * `tensorglot.bench.measure_machine`: NumPy's 1024³ float32 matmul and a 128 MiB copy;
  * every matrix product a point runs, timed alone through the backend's ``ops.linear`` in turn with
    the point itself (so both see the same machine load): its FLOP/s is a candidate for the peak, and
    its bytes (both operands read, the result written) per second one for the bandwidth.
The points are medians, the roof is the best of its probes: a point is the same products plus an
activation, so it can only sit under the roof, and one that did not would mean a wrong cost model.
"""

from __future__ import annotations

import numpy as np

from tensorglot.bench import measure_machine

#: name → (peak FLOP/s, memory bandwidth B/s), from the vendors' datasheets.
PRESETS = {
    "H100 SXM, bf16": (989e12, 3.35e12),
    "H200, bf16": (989e12, 4.8e12),
    "TPU v5e, bf16": (197e12, 819e9),
}


class MachineRoof:
    """This machine's float32 roof: `add_product` for every probe, then `result`."""

    def __init__(self) -> None:
        measured = measure_machine(mb=128, repeats=3)
        self.peaks = [measured["matmul_gflops"] * 1e9]
        self.bandwidths = [measured["bandwidth_gbs"] * 1e9]

    def add_product(self, shape: tuple[int, int, int], seconds: float, *, itemsize: int = 4) -> None:
        """An (M, K) @ (K, N) product that took ``seconds``."""
        m, k, n = shape
        self.peaks.append(2 * m * k * n / seconds)
        self.bandwidths.append(itemsize * (m * k + k * n + m * n) / seconds)

    def result(self) -> dict[str, float]:
        return {"peak_flops": max(self.peaks), "bandwidth": max(self.bandwidths)}


def roof(peak: float, bandwidth: float, intensity: np.ndarray) -> np.ndarray:
    """Attainable FLOP/s at ``intensity`` (FLOP/byte)."""
    return np.minimum(peak, bandwidth * intensity)
