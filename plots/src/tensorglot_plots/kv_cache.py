"""Generation time with and without the KV cache against output length, measured with the backend's
`layers.generate` on a small transformer: recomputing the prefix makes each new token cost the whole
sequence, the cache makes it cost one token."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from tensorglot.bench import time_median

from . import require_capability, style

MEASURED = frozenset({"seconds"})
OUTPUT_LENGTHS = (4, 8, 16, 32)
REPEATS = 3  # recomputing the prefix is slow on a reference backend: keep data() to seconds
PROMPT_LEN = 16
MODES = {"with KV cache (contiguous)": "contiguous", "without cache (recompute the prefix)": None}


def data(backend: Any) -> dict[str, Any]:
    require_capability(backend, "layers", "kv_cache")
    import tensorglot

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
    params = {k: backend.asarray(v, "float32") for k, v in tensorglot.init_params(config, style.SEED).items()}
    rng = np.random.default_rng(style.SEED)
    prompt = backend.asarray(rng.integers(0, config.vocab_size, (1, PROMPT_LEN)), "int64")
    seconds: dict[str, np.ndarray] = {}
    tokens: dict[str, Any] = {}
    for label, cache in MODES.items():
        times = []
        for n in OUTPUT_LENGTHS:

            def run(n: int = n, cache: str | None = cache) -> Any:
                return backend.to_numpy(backend.layers.generate(params, config, prompt, max_new_tokens=n, cache=cache))

            times.append(time_median(run, repeats=REPEATS))
        seconds[label] = np.array(times)
        tokens[label] = np.asarray(run())
    first, second = tokens.values()
    return {
        "output_lengths": np.array(OUTPUT_LENGTHS),
        "prompt_len": PROMPT_LEN,
        "seconds": seconds,
        "same_tokens": bool(np.array_equal(first, second)),
        "config": {"d_model": config.d_model, "n_layers": config.n_layers, "vocab_size": config.vocab_size},
    }


def draw(d: dict[str, Any]) -> Any:
    n = d["output_lengths"]
    cfg = d["config"]
    colors = (style.COLORS["interleaved"], style.COLORS["neox"])
    with style.context():
        fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
        for (label, secs), c in zip(d["seconds"].items(), colors):
            ax.plot(n, secs * 1e3, "-o", color=c, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_title("Greedy generation: the KV cache turns quadratic work into linear")
        ax.set_xlabel(f"new tokens generated (after a {d['prompt_len']}-token prompt)")
        ax.set_ylabel(f"wall time of generate (ms, median of {REPEATS})")
        ax.legend(
            title=f"{cfg['n_layers']} layers, D = {cfg['d_model']}, V = {cfg['vocab_size']}; "
            f"same tokens: {'yes' if d['same_tokens'] else 'NO'}"
        )
    return fig
