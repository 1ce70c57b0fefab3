"""torch kernel rows of ``tensorglot bench``: blockwise vs naive attention (time, peak resident memory),
the MLP's forward+backward FLOP/s against the measured matmul rate, and ``torch.compile`` of a Transformer
training step against eager."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tensorglot.bench import Row, paired_medians, ratio_row, time_median

from ._common import Frontend

ops = Frontend("ops")  # the spec's front end of this backend


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident memory added while ``fn()`` runs: reset the high-water mark (``clear_refs`` 5, Linux),
    run, read ``VmHWM`` − the ``VmRSS`` before. Large tensors are mmapped and unmapped on free, so a
    call's temporaries show in the peak and leave the baseline as it was."""
    before = _rss_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    fn()
    return (_rss_kib("VmHWM:") - before) * 1024


def memory_row(name: str, ours: int, baseline: int, *, limit: float, sizes: dict[str, Any], note: str = "") -> Row:
    r = ours / max(baseline, 1)
    note = f"baseline {baseline / 2**20:.1f} MiB" + (f"; {note}" if note else "")
    return Row(name, ours / 2**20, "MiB", ratio=r, target=f"<= {limit:g}", met=r <= limit, sizes=sizes, note=note)


def attention_rows(quick: bool) -> Iterator[Row]:
    # Quick still needs scores large enough to be mmapped (glibc serves small ones from pages it keeps).
    B, N, H, S = (1, 2, 32, 1024) if quick else (1, 8, 64, 4096)
    bs = 128 if quick else 512  # fewer, larger tiles: per-op threading overhead on a busy CPU (measured 256 → 512)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, N, H, generator=g) for _ in range(3))
    sizes = {"B": B, "N": N, "H": H, "S": S, "T": S, "causal": True, "dtype": "float32", "block_size": bs}

    @torch.no_grad()
    def naive():
        return ops.attention(q, k, v, causal=True)

    @torch.no_grad()
    def flash():
        return ops.flash_attention(q, k, v, causal=True, block_size=bs)

    yield ratio_row("attention.flash_vs_naive.time", *paired_medians(flash, naive), limit=1.25, sizes=sizes)
    yield memory_row(
        "attention.flash_vs_naive.peak_memory",
        peak_rss_bytes(flash),
        peak_rss_bytes(naive),
        limit=1 / 8,
        sizes=sizes,
        note="peak RSS above the RSS before the call (/proc VmHWM); 0 when the tiles fit in pages already held",
    )


def mlp_rows(quick: bool) -> Iterator[Row]:
    """MLP forward + autograd backward as useful FLOP/s (12·B·D·F) over the rate of one (B, D) @ (D, F) mm."""
    Bt, D, F = (256, 128, 512) if quick else (2048, 1024, 4096)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(Bt, D, generator=g).requires_grad_()
    w_in = (torch.randn(D, F, generator=g) * D**-0.5).requires_grad_()
    w_out = (torch.randn(F, D, generator=g) * F**-0.5).requires_grad_()
    dy = torch.randn(Bt, D, generator=g)

    def step():
        for t in (x, w_in, w_out):
            t.grad = None
        ops.mlp(x, w_in, w_out).backward(dy)

    t_step = time_median(step, warmup=2)
    xd, wd = x.detach(), w_in.detach()
    t_mm = time_median(lambda: torch.mm(xd, wd), warmup=2)
    rate, peak = 12 * Bt * D * F / t_step / 1e9, 2 * Bt * D * F / t_mm / 1e9
    yield Row(
        "mlp.train_step_flops_vs_matmul",
        rate,
        "GFLOP/s",
        ratio=rate / peak,
        target=">= 0.7",
        met=rate / peak >= 0.7,
        sizes={"B": Bt, "D": D, "F": F, "dtype": "float32", "activation": "relu", "threads": torch.get_num_threads()},
        note=f"torch.mm peak {peak:.1f} GFLOP/s",
    )


def compile_rows(quick: bool) -> Iterator[Row]:
    """One training step (loss and every gradient) of a small Transformer, eager vs ``torch.compile``."""
    import tensorglot

    layers = tensorglot.get_backend("torch").layers
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
    params = {
        n: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        for n, a in tensorglot.init_params(cfg, 0).items()
    }
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, S)))
    targets = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, S)))
    sizes = {"B": B, "S": S, "D": cfg.d_model, "L": cfg.n_layers, "V": cfg.vocab_size, "dtype": "float32"}

    def eager_step(tokens, targets, params):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        value = layers.loss(tokens, targets, leaves, cfg)
        return value, torch.autograd.grad(value, list(leaves.values()))

    compiled_step = torch.compile(eager_step)
    try:
        compiled_step(tokens, targets, params)  # compiles here, outside the timing
    except Exception as err:  # no C++ toolchain, or a graph break torch cannot compile: say so in the table
        yield Row("compile.transformer_step_vs_eager", float("nan"), "s", note=f"torch.compile failed: {err!r}"[:200])
        return
    with torch.no_grad():
        logits_eager = layers.transformer(tokens, params, cfg)
        logits_compiled = torch.compile(lambda t, p: layers.transformer(t, p, cfg))(tokens, params)
    same = torch.allclose(logits_compiled, logits_eager, rtol=1e-4, atol=1e-5)
    (v_c, g_c), (v_e, g_e) = compiled_step(tokens, targets, params), eager_step(tokens, targets, params)
    grads_same = torch.allclose(v_c, v_e, rtol=1e-4) and all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(g_c, g_e)
    )
    row = ratio_row(
        "compile.transformer_step_vs_eager",
        time_median(lambda: compiled_step(tokens, targets, params), warmup=2),
        time_median(lambda: eager_step(tokens, targets, params), warmup=2),
        limit=1.0,
        sizes=sizes,
        note=f"same logits: {same}; same loss and gradients: {grads_same}",
    )
    row.met = row.met and same and grads_same
    yield row


def kernel_rows(quick: bool = False) -> Iterator[Row]:
    yield from attention_rows(quick)
    yield from mlp_rows(quick)
    yield from compile_rows(quick)
