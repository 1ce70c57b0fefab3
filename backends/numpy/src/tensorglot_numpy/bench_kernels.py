"""NumPy kernel rows of ``tensorglot bench``: blockwise vs naive attention (time, peak memory by tracemalloc)
and the MLP's forward+backward FLOP/s against this machine's measured matmul rate."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tensorglot.bench import Row, paired_medians, ratio_row, time_median

from ._common import lazy_frontend

ops = lazy_frontend("ops")

# NumPy pays Python overhead per tile, so its table runs larger tiles than the spec's default of 128;
# the memory stays O(block_size²), far under the S × T of the naive attention.
BLOCK_SIZE = 512


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes NumPy allocates during ``fn()`` (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory_row(name: str, ours: int, baseline: int, *, limit: float, sizes: dict[str, Any], note: str = "") -> Row:
    r = ours / baseline
    note = f"baseline {baseline / 2**20:.1f} MiB" + (f"; {note}" if note else "")
    return Row(name, ours / 2**20, "MiB", ratio=r, target=f"<= {limit:g}", met=r <= limit, sizes=sizes, note=note)


def attention_rows(quick: bool) -> Iterator[Row]:
    B, N, H, S = (1, 2, 32, 256) if quick else (1, 8, 64, 4096)
    bs = 64 if quick else BLOCK_SIZE
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, S, N, H), dtype=np.float32) for _ in range(3))
    sizes = {"B": B, "N": N, "H": H, "S": S, "T": S, "causal": True, "dtype": "float32", "block_size": bs}

    def naive():
        return ops.attention(q, k, v, causal=True)

    def flash():
        return ops.flash_attention(q, k, v, causal=True, block_size=bs)

    yield ratio_row(
        "attention.flash_vs_naive.time",
        *paired_medians(flash, naive),
        limit=1.5,
        sizes=sizes,
        note="causal key tiles past the diagonal are skipped",
    )
    yield memory_row(
        "attention.flash_vs_naive.peak_memory", peak_bytes(flash), peak_bytes(naive), limit=1 / 8, sizes=sizes
    )


def mlp_rows(quick: bool) -> Iterator[Row]:
    """One training step of the MLP (forward, then the backward that recomputes x @ w_in) as useful FLOP/s
    (12·B·D·F: two forward and four backward matmuls) over the rate of one (B, D) @ (D, F) matmul."""
    Bt, D, F = (256, 128, 512) if quick else (2048, 1024, 4096)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((Bt, D), dtype=np.float32)
    w_in = rng.standard_normal((D, F), dtype=np.float32) / np.float32(np.sqrt(D))
    w_out = rng.standard_normal((F, D), dtype=np.float32) / np.float32(np.sqrt(F))
    dy = rng.standard_normal((Bt, D), dtype=np.float32)

    def step():
        ops.mlp(x, w_in, w_out)
        return ops.mlp_backward(x, w_in, w_out, dy)

    t_step = time_median(step)
    t_mm = time_median(lambda: x @ w_in)
    rate, peak = 12 * Bt * D * F / t_step / 1e9, 2 * Bt * D * F / t_mm / 1e9
    sizes = {"B": Bt, "D": D, "F": F, "dtype": "float32", "activation": "relu"}
    yield Row(
        "mlp.train_step_flops_vs_matmul",
        rate,
        "GFLOP/s",
        ratio=rate / peak,
        target=">= 0.7",
        met=rate / peak >= 0.7,
        sizes=sizes,
        note=f"matmul peak {peak:.1f} GFLOP/s; the backward recomputes x @ w_in (7 matmuls run)",
    )


def kernel_rows(quick: bool = False) -> Iterator[Row]:
    yield from attention_rows(quick)
    yield from mlp_rows(quick)
