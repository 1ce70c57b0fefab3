"""Attention's arithmetic intensity: prefill against decode, over sequence length and batch (theory).

One attention layer, bf16 (2 bytes), N query heads, K KV heads, head dim H, nothing cached on chip:
  * prefill of S tokens: FLOPs 4·B·N·S²·H (q·kᵀ and p·v, the full square); bytes 2·B·S·H·(2N + 2K)
    (q, out, k, v once each) → intensity N·S/(N + K): it grows with S.
  * decode of one token against T = S cached keys: FLOPs 4·B·N·T·H; bytes 2·B·H·(2N + 2K·T)
    → intensity N·T/(N + K·T), which tends to N/K: the whole cache is read for one token.
  * neither depends on B: every sequence has its own keys. The projections (wq, wk, wv, wo, shared by
    the batch) are what batching helps: FLOPs 2·B·P, bytes 2·(P + B·(2D + (N + 2K)·H + N·H))
    with P = D·H·(2N + 2K) parameters.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style
from ._roofline import PRESETS

MEASURED: frozenset[str] = frozenset()
D_MODEL, HEAD_DIM, QUERY_HEADS = 4096, 128, 32
KV_HEADS = {"MHA (K = 32)": 32, "GQA (K = 8)": 8}
SEQ_LENS = 2 ** np.arange(7, 18)  # 128 … 131072 tokens
BATCHES = 2 ** np.arange(0, 10)  # 1 … 512
DECODE_CONTEXT = 4096
ITEMSIZE = 2  # bf16


def prefill_flops(b: int, s: int, n: int, h: int) -> int:
    return 4 * b * n * s * s * h


def prefill_bytes(b: int, s: int, n: int, k: int, h: int, itemsize: int = ITEMSIZE) -> int:
    return itemsize * b * s * h * (2 * n + 2 * k)


def decode_flops(b: int, t: int, n: int, h: int) -> int:
    return 4 * b * n * t * h


def decode_bytes(b: int, t: int, n: int, k: int, h: int, itemsize: int = ITEMSIZE) -> int:
    return itemsize * b * h * (2 * n + 2 * k * t)


def projection_flops(b: int, d: int, n: int, k: int, h: int) -> int:
    return 2 * b * d * h * (2 * n + 2 * k)


def projection_bytes(b: int, d: int, n: int, k: int, h: int, itemsize: int = ITEMSIZE) -> int:
    return itemsize * (d * h * (2 * n + 2 * k) + b * (2 * d + (n + 2 * k) * h + n * h))


def data(backend: Any) -> dict[str, Any]:
    n, h, d = QUERY_HEADS, HEAD_DIM, D_MODEL
    by_seq: dict[str, np.ndarray] = {}
    by_batch: dict[str, np.ndarray] = {}
    for label, k in KV_HEADS.items():
        by_seq[f"prefill, {label}"] = np.array(
            [prefill_flops(1, s, n, h) / prefill_bytes(1, s, n, k, h) for s in SEQ_LENS.tolist()]
        )
        by_seq[f"decode, {label}"] = np.array(
            [decode_flops(1, t, n, h) / decode_bytes(1, t, n, k, h) for t in SEQ_LENS.tolist()]
        )
        by_batch[f"decode attention, {label}"] = np.array(
            [decode_flops(b, DECODE_CONTEXT, n, h) / decode_bytes(b, DECODE_CONTEXT, n, k, h) for b in BATCHES.tolist()]
        )
    k = KV_HEADS["GQA (K = 8)"]
    by_batch["decode projections (wq, wk, wv, wo), GQA"] = np.array(
        [projection_flops(b, d, n, k, h) / projection_bytes(b, d, n, k, h) for b in BATCHES.tolist()]
    )
    return {
        "seq_lens": SEQ_LENS.copy(),
        "batches": BATCHES.copy(),
        "by_seq": by_seq,
        "by_batch": by_batch,
        "ridges": {name: peak / bw for name, (peak, bw) in PRESETS.items()},
        "config": {"d_model": d, "head_dim": h, "query_heads": n, "decode_context": DECODE_CONTEXT},
    }


def _ridges(ax: Any, ridges: dict[str, float], x_text: float) -> None:
    for name, ridge in ridges.items():
        if name.startswith("H100"):
            ax.axhline(ridge, color="k", ls="--", lw=1)
            ax.text(x_text, ridge * 1.12, f"{name.split(',')[0]} critical intensity {ridge:.0f}", fontsize=8)


def draw(d: dict[str, Any]) -> Any:
    colors = {"MHA": style.COLORS["interleaved"], "GQA": style.COLORS["neox"]}
    cfg = d["config"]
    with style.context():
        fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained", sharey=True)
        for label, y in d["by_seq"].items():
            c = colors["GQA" if "GQA" in label else "MHA"]
            ax_s.plot(d["seq_lens"], y, "-o" if label.startswith("prefill") else "--s", ms=3.5, color=c, label=label)
        _ridges(ax_s, d["ridges"], d["seq_lens"][0])
        ax_s.set_xscale("log", base=2)
        ax_s.set_yscale("log")
        ax_s.set_title("Prefill grows with S; decode is stuck near N/K")
        ax_s.set_xlabel("sequence length S (tokens; decode: cached tokens T)")
        ax_s.set_ylabel("arithmetic intensity (FLOP/byte, bf16)")
        ax_s.legend(loc="center right", bbox_to_anchor=(1.0, 0.64))
        for label, y in d["by_batch"].items():
            if "projections" in label:
                ax_b.plot(d["batches"], y, "-^", ms=4, color=style.COLORS["scaled"], label=label)
            else:
                c = colors["GQA" if "GQA" in label else "MHA"]
                ax_b.plot(d["batches"], y, "--s", ms=3.5, color=c, label=label)
        _ridges(ax_b, d["ridges"], d["batches"][0])
        ax_b.set_xscale("log", base=2)
        ax_b.set_title(f"Decode at T = {cfg['decode_context']}: batching helps the weights, not the cache")
        ax_b.set_xlabel("batch size B (sequences)")
        ax_b.legend(loc="upper left")
        fig.suptitle(
            f"Attention arithmetic intensity: N = {cfg['query_heads']} query heads, "
            f"head dim {cfg['head_dim']}, D = {cfg['d_model']}"
        )
    return fig
