"""Shared by the roofline figures: hardware presets and this machine's roof, measured in the run.

A roof is min(peak FLOP/s, bandwidth × intensity). The presets are vendor datasheet numbers (dense,
no sparsity). This machine's roof is the best rate observed: its compute peak is the fastest of NumPy's
1024³ float32 matmul (`tensorglot.bench.measure_machine`) and the backend's own `ops.linear` on the
sizes the figure times, and its bandwidth the faster of `measure_machine`'s copy (read + write counted)
and a read-only NumPy sum over 128 MiB (both four times a large L3 cache) — a read-only stream (what a batch-1 MLP does with its weights)
runs faster than a copy, so the copy alone would be a roof that points could beat.
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


def read_bandwidth(*, mb: int = 128, repeats: int = 5) -> float:
    """Bytes per second of a read-only pass (a NumPy sum) over ``mb`` MiB of float32."""
    src = np.ones(mb * 2**20 // 4, dtype=np.float32)
    return src.nbytes / best_time(lambda: src.sum(), repeats=repeats)


def machine_roof(backend: Any, matmul_shapes: list[tuple[int, int, int]]) -> dict[str, float]:
    """This machine's float32 roof: {"peak_flops": FLOP/s, "bandwidth": B/s}, measured now.

    ``matmul_shapes`` are (M, K, N) products timed through ``backend.ops.linear`` as candidates for the
    compute peak, beside NumPy's.
    """
    measured = measure_machine(mb=128, repeats=3)
    peaks = [measured["matmul_gflops"] * 1e9]
    rng = np.random.default_rng(0)
    for m, k, n in matmul_shapes:
        a = backend.asarray(rng.standard_normal((m, k), dtype=np.float32), "float32")
        b = backend.asarray(rng.standard_normal((k, n), dtype=np.float32), "float32")
        peaks.append(2 * m * k * n / best_time(lambda a=a, b=b: backend.to_numpy(backend.ops.linear(a, b))))
    bandwidth = max(measured["bandwidth_gbs"] * 1e9, read_bandwidth())
    return {"peak_flops": max(peaks), "bandwidth": bandwidth}


def roof(peak: float, bandwidth: float, intensity: np.ndarray) -> np.ndarray:
    """Attainable FLOP/s at ``intensity`` (FLOP/byte)."""
    return np.minimum(peak, bandwidth * intensity)
