"""The NumPy bench table (`tensorglot bench --backend numpy`): each op's forward + backward time, the
MLP's training-step FLOP rate against a plain matmul, and generation with against without a KV cache.

There is no other NumPy implementation to race, so the op rows are times at a stated size; the two
rows with targets are ratios against baselines timed in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from tensorglot import TransformerConfig, init_params
from tensorglot.bench import Row, time_median

from . import parallel
from ._common import lazy_frontend
from .bench_kernels import attention_rows

ops, encodings, layers = lazy_frontend("ops"), lazy_frontend("encodings"), lazy_frontend("layers")

#: Forward + backward of one op, at a size for the full table and one for ``--quick``.
OP_SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "softmax": ({"R": 2048, "C": 2048}, {"R": 256, "C": 256}),
    "linear": ({"B": 2048, "I": 1024, "O": 1024}, {"B": 256, "I": 128, "O": 128}),
    "mlp": ({"B": 1024, "D": 512, "F": 2048}, {"B": 128, "D": 64, "F": 256}),
    "swiglu": ({"B": 1024, "D": 512, "F": 2048}, {"B": 128, "D": 64, "F": 256}),
    "rms_norm": ({"R": 4096, "D": 1024}, {"R": 512, "D": 128}),
    "attention": ({"B": 2, "S": 512, "N": 8, "K": 2, "H": 64}, {"B": 1, "S": 64, "N": 4, "K": 2, "H": 16}),
    "rope": ({"B": 2, "S": 512, "N": 8, "H": 64}, {"B": 1, "S": 64, "N": 4, "H": 16}),
}


def _op_step(name: str, s: dict[str, int], rng: np.random.Generator) -> Callable[[], Any]:
    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    if name == "softmax":
        x, dy = rand(s["R"], s["C"]), rand(s["R"], s["C"])
        return lambda: ops.softmax_backward(ops.softmax(x), dy)
    if name == "linear":
        x, w, b, dy = rand(s["B"], s["I"]), rand(s["I"], s["O"]), rand(s["O"]), rand(s["B"], s["O"])
        return lambda: (ops.linear(x, w, b), ops.linear_backward(x, w, dy, bias=True))
    if name in ("mlp", "swiglu"):
        B, D, F = s["B"], s["D"], s["F"]
        x, dy, w_down = rand(B, D), rand(B, D), rand(F, D, scale=F**-0.5)
        w1, w2 = rand(D, F, scale=D**-0.5), rand(D, F, scale=D**-0.5)
        if name == "mlp":
            return lambda: (ops.mlp(x, w1, w_down), ops.mlp_backward(x, w1, w_down, dy))
        return lambda: (ops.swiglu(x, w1, w2, w_down), ops.swiglu_backward(x, w1, w2, w_down, dy))
    if name == "rms_norm":
        x, w, dy = rand(s["R"], s["D"]), rand(s["D"]), rand(s["R"], s["D"])
        return lambda: (ops.rms_norm(x, w), ops.rms_norm_backward(x, w, dy))
    if name == "attention":
        q, dy = rand(s["B"], s["S"], s["N"], s["H"]), rand(s["B"], s["S"], s["N"], s["H"])
        k, v = rand(s["B"], s["S"], s["K"], s["H"]), rand(s["B"], s["S"], s["K"], s["H"])
        return lambda: (ops.attention(q, k, v, causal=True), ops.attention_backward(q, k, v, dy, causal=True))
    x, dy = rand(s["B"], s["S"], s["N"], s["H"]), rand(s["B"], s["S"], s["N"], s["H"])  # rope
    return lambda: (encodings.rope(x), encodings.rope_backward(dy))


def op_rows(*, quick: bool) -> Iterable[Row]:
    rng = np.random.default_rng(0)
    for name, (full, small) in OP_SIZES.items():
        sizes = small if quick else full
        t = time_median(_op_step(name, sizes, rng), repeats=5)
        yield Row(f"{name} forward+backward", t, "s", sizes=dict(sizes, dtype="float32"))


def interleaved_medians(a: Callable[[], Any], b: Callable[[], Any], *, repeats: int = 5) -> tuple[float, float]:
    """Median times of ``a`` and ``b`` run alternately after a warm-up of each, so that a busy machine
    slows both alike (a ratio of two medians taken minutes apart measures the neighbours' load)."""
    a(), b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        for f, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def mlp_flops_row(*, quick: bool) -> Row:
    B, D, F = (256, 256, 1024) if quick else (2048, 1024, 4096)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((B, D), dtype=np.float32), rng.standard_normal((B, D), dtype=np.float32)
    w_in = rng.standard_normal((D, F), dtype=np.float32) * D**-0.5
    w_out = rng.standard_normal((F, D), dtype=np.float32) * F**-0.5
    t_matmul, t_mlp = interleaved_medians(
        lambda: x @ w_in, lambda: (ops.mlp(x, w_in, w_out), ops.mlp_backward(x, w_in, w_out, dy))
    )
    ours, base = 12 * B * D * F / t_mlp, 2 * B * D * F / t_matmul  # forward 2 matmuls, backward 4
    ratio = ours / base
    target = None if quick else ">= 0.7"  # the target is for the stated size; --quick is a smoke test
    return Row(
        "mlp train step FLOP/s ÷ matmul FLOP/s",
        ours / 1e9,
        "GFLOP/s",
        ratio=ratio,
        target=target,
        met=None if quick else ratio >= 0.7,
        sizes={"B": B, "D": D, "F": F, "dtype": "float32", "activation": "relu"},
        note=f"12·B·D·F useful FLOPs (mlp_backward's recomputed x·w_in not counted); baseline x @ w_in "
        f"{base / 1e9:.1f} GFLOP/s in the same run",
    )


def generation_rows(*, quick: bool) -> Iterable[Row]:
    if quick:
        config = TransformerConfig(
            vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=192, max_seq_len=128
        )
        prompt_len = new = 32
    else:
        config = TransformerConfig(
            vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=768, max_seq_len=512
        )
        prompt_len = new = 256
    params = init_params(config, 0)
    prompt = np.random.default_rng(2).integers(0, config.vocab_size, (1, prompt_len))
    outs: dict[str | None, np.ndarray] = {}

    def run(cache: str | None) -> Callable[[], None]:
        def go() -> None:
            outs[cache] = layers.generate(params, config, prompt, max_new_tokens=new, cache=cache)

        return go

    t_cached = time_median(run("contiguous"), repeats=5)
    t_paged = time_median(run("paged"), repeats=5)
    if quick:
        t_full = time_median(run(None), repeats=5)
        how = "median of 5"
    else:  # recomputing the prefix at every step takes minutes here: one run
        start = time.perf_counter()
        run(None)()
        t_full = time.perf_counter() - start
        how = "one run"
    same = bool(np.array_equal(outs[None], outs["contiguous"]) and np.array_equal(outs[None], outs["paged"]))
    sizes = {"layers": config.n_layers, "d_model": config.d_model, "prompt": prompt_len, "new": new, "dtype": "float32"}
    speedup = t_full / t_cached
    yield Row(
        "generate: no-cache time ÷ KV-cache time",
        speedup,
        "× faster",
        ratio=speedup,
        target=None if quick else ">= 20",
        met=same if quick else speedup >= 20 and same,
        sizes=sizes,
        note=f"tokens identical: {'yes' if same else 'NO'}; cached {t_cached:.3f} s (median of 5), "
        f"no cache {t_full:.2f} s ({how})",
    )
    yield Row(
        "generate: paged ÷ contiguous cache time",
        t_paged / t_cached,
        "ratio",
        ratio=t_paged / t_cached,
        sizes=sizes | {"block_size": 16},
        note=f"paged {t_paged:.3f} s (median of 5)",
    )


def rows(*, quick: bool = False) -> Iterable[Row]:
    yield from op_rows(quick=quick)
    yield mlp_flops_row(quick=quick)
    yield from generation_rows(quick=quick)
    yield from attention_rows(quick)  # blockwise vs naive; the MLP row above already covers the matmul peak
    yield from parallel.parallel_rows(quick)
