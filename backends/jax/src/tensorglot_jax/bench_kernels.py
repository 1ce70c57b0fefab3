"""JAX kernel rows of ``tensorglot bench``: blockwise vs naive attention (time, and the temporary memory of
the compiled programs from XLA's memory analysis), the MLP's forward+backward FLOP/s against the measured
matmul rate, and ``jax.jit`` of a whole Transformer training step against op-by-op dispatch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tensorglot.bench import Row, paired_medians, ratio_row, time_median

from ._common import lazy_frontend

ops = lazy_frontend("ops")


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    return time_median(lambda: jax.block_until_ready(fn(*args)), warmup=2)


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Bytes of temporaries XLA allocates for the compiled ``fn`` (inputs and outputs not counted)."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError("bench: this JAX platform gives no memory analysis of compiled programs")
    return int(analysis.temp_size_in_bytes)


def memory_row(name: str, ours: int, baseline: int, *, limit: float, sizes: dict[str, Any], note: str = "") -> Row:
    r = ours / max(baseline, 1)
    note = f"baseline {baseline / 2**20:.1f} MiB" + (f"; {note}" if note else "")
    return Row(name, ours / 2**20, "MiB", ratio=r, target=f"<= {limit:g}", met=r <= limit, sizes=sizes, note=note)


def attention_rows(quick: bool) -> Iterator[Row]:
    B, N, H, S = (1, 2, 32, 256) if quick else (1, 8, 64, 4096)
    bs = 64 if quick else 256
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, N, H), dtype=np.float32)) for _ in range(3))
    sizes = {"B": B, "N": N, "H": H, "S": S, "T": S, "causal": True, "dtype": "float32", "block_size": bs}

    def naive(q, k, v):
        return ops.attention(q, k, v, causal=True)

    def flash(q, k, v):
        return ops.flash_attention(q, k, v, causal=True, block_size=bs)

    naive_jit, flash_jit = jax.jit(naive), jax.jit(flash)
    yield ratio_row(
        "attention.flash_vs_naive.time",
        *paired_medians(
            lambda: jax.block_until_ready(flash_jit(q, k, v)), lambda: jax.block_until_ready(naive_jit(q, k, v))
        ),
        limit=1.25,
        sizes=sizes,
    )
    yield memory_row(
        "attention.flash_vs_naive.peak_memory",
        temp_bytes(flash, q, k, v),
        temp_bytes(naive, q, k, v),
        limit=1 / 8,
        sizes=sizes,
        note="XLA memory_analysis temp_size_in_bytes of the jitted programs",
    )


def mlp_rows(quick: bool) -> Iterator[Row]:
    """MLP forward + VJP, jitted, as useful FLOP/s (12·B·D·F) over the rate of one jitted (B, D) @ (D, F)."""
    Bt, D, F = (256, 128, 512) if quick else (2048, 1024, 4096)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((Bt, D), dtype=np.float32))
    w_in = jnp.asarray(rng.standard_normal((D, F), dtype=np.float32) / np.sqrt(D, dtype=np.float32))
    w_out = jnp.asarray(rng.standard_normal((F, D), dtype=np.float32) / np.sqrt(F, dtype=np.float32))
    dy = jnp.asarray(rng.standard_normal((Bt, D), dtype=np.float32))

    @jax.jit
    def step(x, w_in, w_out, dy):
        y, vjp = jax.vjp(ops.mlp, x, w_in, w_out)
        return y, vjp(dy)

    t_step = _timed(step, x, w_in, w_out, dy)
    t_mm = _timed(jax.jit(jnp.matmul), x, w_in)
    rate, peak = 12 * Bt * D * F / t_step / 1e9, 2 * Bt * D * F / t_mm / 1e9
    yield Row(
        "mlp.train_step_flops_vs_matmul",
        rate,
        "GFLOP/s",
        ratio=rate / peak,
        target=">= 0.7",
        met=rate / peak >= 0.7,
        sizes={"B": Bt, "D": D, "F": F, "dtype": "float32", "activation": "relu"},
        note=f"jitted matmul peak {peak:.1f} GFLOP/s",
    )


def jit_rows(quick: bool) -> Iterator[Row]:
    """One training step (loss and every gradient) of a small Transformer: ``jax.jit`` of the whole step
    against the same step dispatched op by op."""
    import tensorglot

    layers = tensorglot.get_backend("jax").layers
    cfg = tensorglot.TransformerConfig(
        vocab_size=256 if quick else 1024,
        d_model=64 if quick else 256,
        n_layers=2 if quick else 4,
        n_heads=4 if quick else 8,
        n_kv_heads=2 if quick else 4,
        head_dim=16 if quick else 32,
        d_ff=128 if quick else 1024,
        activation="swiglu",
        max_seq_len=256,
    )
    B, S = (2, 32) if quick else (8, 256)
    params = {n: jnp.asarray(a) for n, a in tensorglot.init_params(cfg, 0).items()}
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), dtype=jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), dtype=jnp.int32)

    def step(params, tokens, targets):
        return jax.value_and_grad(lambda p: layers.loss(tokens, targets, p, cfg))(params)

    jitted = jax.jit(step)
    (l_j, g_j), (l_e, g_e) = jitted(params, tokens, targets), step(params, tokens, targets)
    same = bool(jnp.allclose(l_j, l_e, rtol=1e-4)) and all(
        bool(jnp.allclose(g_j[n], g_e[n], rtol=1e-3, atol=1e-5)) for n in g_e
    )
    row = ratio_row(
        "jit.transformer_step_vs_op_by_op",
        _timed(jitted, params, tokens, targets),
        _timed(step, params, tokens, targets),
        limit=1.0,
        sizes={"B": B, "S": S, "D": cfg.d_model, "L": cfg.n_layers, "V": cfg.vocab_size, "dtype": "float32"},
        note=f"same loss and gradients: {same}",
    )
    row.met = row.met and same
    yield row


def kernel_rows(quick: bool = False) -> Iterator[Row]:
    yield from attention_rows(quick)
    yield from mlp_rows(quick)
    yield from jit_rows(quick)
