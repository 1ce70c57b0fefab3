"""Shared by the roofline figures: hardware presets and this machine's roof, measured in the run.

A roof is min(peak FLOP/s, bandwidth × intensity). The presets are vendor datasheet numbers (dense,
no sparsity). This machine's roof is the best rate it showed in the run, while the points on it are
medians, so that a point above the roof would mean a wrong cost model, not a noisy neighbour:
  * compute: the fastest of NumPy's 1024³ float32 matmul (`tensorglot.bench.measure_machine`) and the
    backend's own `ops.linear` on the figure's largest product, timed before and after the points;
  * memory: the fastest of `measure_machine`'s copy (read + write counted), a read-only NumPy pass over
    a buffer the size of the figure's working set, and the backend's own `ops.linear` of one row
    against a matrix of that size (a matrix-vector product reads the matrix once; it counts those
    bytes). A read-only stream beats a copy, a multi-threaded one beats NumPy's single-threaded sum,
    and a working set that fits a cache beats main memory, so the roof is measured on the same traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tensorglot.bench import measure_machine

#: name → (peak FLOP/s, memory bandwidth B/s), from the vendors' datasheets.
PRESETS = {
    "H100 SXM, bf16": (989e12, 3.35e12),
    "H200, bf16": (989e12, 4.8e12),
    "TPU v5e, bf16": (197e12, 819e9),
}


def best_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` runs after warm-up: a roof is the best the machine did, not its median."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(nbytes: int, *, repeats: int = 7) -> float:
    """Bytes per second of a read-only pass (a NumPy sum) over ``nbytes`` of float32."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    return src.nbytes / best_time(lambda: src.sum(), repeats=repeats)


def linear_time(backend: Any, shape: tuple[int, int, int], *, repeats: int = 7) -> float:
    """The best time of ``backend.ops.linear`` on an (M, K) @ (K, N) float32 product."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((m, k), dtype=np.float32), "float32")
    b = backend.asarray(rng.standard_normal((k, n), dtype=np.float32), "float32")
    # to_numpy waits for asynchronous backends, so the time covers the whole computation
    return best_time(lambda: backend.to_numpy(backend.ops.linear(a, b)), repeats=repeats)


class MachineRoof:
    """This machine's float32 roof; call `sample` before and after timing the points, then `result`."""

    def __init__(self, backend: Any, matmul_shape: tuple[int, int, int], gemv_shape: tuple[int, int]) -> None:
        """``matmul_shape`` (M, K, N) probes the compute peak; ``gemv_shape`` (K, N), a float32 matrix as
        large as the figure's working set, probes the bandwidth."""
        self.backend, self.matmul_shape, self.gemv_shape = backend, matmul_shape, gemv_shape
        self.working_set_bytes = 4 * gemv_shape[0] * gemv_shape[1]
        measured = measure_machine(mb=128, repeats=3)
        self.peaks = [measured["matmul_gflops"] * 1e9]
        self.bandwidths = [measured["bandwidth_gbs"] * 1e9]

    def sample(self) -> None:
        m, k, n = self.matmul_shape
        self.peaks.append(2 * m * k * n / linear_time(self.backend, self.matmul_shape))
        self.bandwidths.append(read_bandwidth(self.working_set_bytes))
        self.bandwidths.append(self.working_set_bytes / linear_time(self.backend, (1, *self.gemv_shape)))

    def result(self) -> dict[str, float]:
        return {
            "peak_flops": max(self.peaks),
            "bandwidth": max(self.bandwidths),
            "working_set_bytes": float(self.working_set_bytes),
        }


def roof(peak: float, bandwidth: float, intensity: np.ndarray) -> np.ndarray:
    """Attainable FLOP/s at ``intensity`` (FLOP/byte)."""
    return np.minimum(peak, bandwidth * intensity)
