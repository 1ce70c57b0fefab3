"""Greedy generation with and without the KV cache against output length, measured by the bench's
generate row (`tensorglot.bench.generate_times`) on a small transformer: recomputing the prefix makes
each new token cost the whole sequence so far (quadratic in all), the cache one token (linear)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import require_capability, style

MEASURED = frozenset({"seconds"})
OUTPUT_LENGTHS = (32, 64, 128, 256)
REPEATS = 3  # recomputing the prefix is slow on a reference backend: keep data() to seconds
PROMPT_LEN = 16
LABELS = ("with KV cache (contiguous)", "without cache (recompute the prefix)")


def data(backend: Any) -> dict[str, Any]:
    require_capability(backend, "layers", "kv_cache")
    import tensorglot
    from tensorglot import bench

    config = tensorglot.TransformerConfig(
        vocab_size=256,
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=256,
        max_seq_len=PROMPT_LEN + max(OUTPUT_LENGTHS),
    )
    ctx = bench.Context(backend)
    runs = [bench.generate_times(ctx, config, PROMPT_LEN, n, repeats=REPEATS) for n in OUTPUT_LENGTHS]
    return {
        "output_lengths": np.array(OUTPUT_LENGTHS),
        "prompt_len": PROMPT_LEN,
        "seconds": {label: np.array([r[i] for r in runs]) for i, label in enumerate(LABELS)},
        "same_tokens": all(r[2] for r in runs),
        "config": {"d_model": config.d_model, "n_layers": config.n_layers, "vocab_size": config.vocab_size},
    }


def draw(d: dict[str, Any]) -> Any:
    n, cfg = d["output_lengths"], d["config"]
    colors = (style.COLORS["interleaved"], style.COLORS["neox"])
    with style.context():
        fig, (total, per_token) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
        for (label, secs), c in zip(d["seconds"].items(), colors):
            total.plot(n, secs, "-o", color=c, label=label)
            per_token.plot(n, secs / n * 1e3, "-o", color=c, label=label)
        for ax in (total, per_token):
            ax.set_xlabel(f"new tokens generated (after a {d['prompt_len']}-token prompt)")
            ax.set_xlim(0, n[-1] * 1.05)
            ax.set_ylim(bottom=0)
        total.set_title("wall time of generate (quadratic without the cache)")
        total.set_ylabel(f"seconds (median of {REPEATS})")
        per_token.set_title("time per new token (grows without the cache)")
        per_token.set_ylabel("ms per new token")
        total.legend(
            title=f"{cfg['n_layers']} layers, D = {cfg['d_model']}, V = {cfg['vocab_size']}; "
            f"same tokens: {'yes' if d['same_tokens'] else 'NO'}"
        )
        fig.suptitle("Greedy generation: recomputing the prefix costs the whole sequence per token, the KV cache one")
    return fig
