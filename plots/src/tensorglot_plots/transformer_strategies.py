"""The transformer's parallel strategies side by side at one config and world size, from the spec's cost
model (`tensorglot.parallel.transformer_cost`, whose every number `transformer_step` measures and the
tests compare): the bytes each device sends per training step, by collective, and what each rank keeps —
parameters, gradients, AdamW's state and the activations its backward reads (ZB-H1: and W's buffers)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

import tensorglot
from tensorglot import parallel
from tensorglot.parallel.transformer_checks import check_transformer_step

from . import style

MEASURED: frozenset[str] = frozenset()
#: a ~0.5B-parameter Llama-shaped model (GQA, SwiGLU) in bfloat16, a 16 × 2048-token batch, 8 devices
CONFIG = tensorglot.TransformerConfig(
    vocab_size=32000,
    d_model=2048,
    n_layers=16,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    d_ff=5632,
    max_seq_len=2048,
    activation="swiglu",
)
BATCH, SEQ, WORLD, MICROBATCHES, DTYPE = 16, 2048, 8, 8, "bfloat16"
#: (label, strategy, schedule): every strategy, pp under 1F1B and ZB-H1; the meshes at their default sizes
RUNS = [(s, s, "1f1b") for s in parallel.TRANSFORMER_STRATEGIES if s != "pp"]
RUNS += [("pp 1f1b", "pp", "1f1b"), ("pp zb_h1", "pp", "zb_h1")]
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send")
MEMORY = ("params", "grads", "optimizer state", "activations")


def data(backend: Any) -> dict[str, Any]:
    labels, sent, kept, bubbles = [], [], [], []
    for label, strategy, schedule in RUNS:
        m = MICROBATCHES if strategy == "pp" else None
        c = parallel.transformer_cost(
            strategy, CONFIG, BATCH, SEQ, WORLD, microbatches=m, dtype=DTYPE, optimizer="adamw", schedule=schedule
        )
        if "_" in strategy and strategy != "tp_sp":  # a mesh: its sizes as check_transformer_step picks them
            _, tp, pp = check_transformer_step(CONFIG, BATCH, SEQ, strategy, WORLD, microbatches=m)
            sizes = {"dp": WORLD // (tp * pp), "fsdp": WORLD // tp, "pp": pp, "tp": tp}
            label += " " + "×".join(str(sizes[axis]) for axis in strategy.split("_"))
        labels.append(label)
        sent.append([c.bytes_by_kind.get(k, 0) for k in KINDS])
        kept.append(
            [c.param_bytes_per_rank, c.grad_bytes_per_rank, c.optimizer_bytes_per_rank, c.activation_bytes_per_rank]
        )
        bubbles.append(c.bubble)
    return {
        "labels": labels,
        "bytes_by_kind": np.array(sent, np.float64),  # (strategies, KINDS)
        "memory": np.array(kept, np.float64),  # (strategies, MEMORY)
        "bubble": np.array(bubbles),
    }


def _stacked(ax: Any, values: np.ndarray, names: tuple[str, ...], colors: list[str], labels: list[str]) -> None:
    x, bottom = np.arange(len(labels)), np.zeros(len(labels))
    for k, (name, color) in enumerate(zip(names, colors)):
        ax.bar(x, values[:, k], bottom=bottom, color=color, width=0.7, label=name.replace("_", "-"))
        bottom += values[:, k]
    ax.set_xticks(x, labels, rotation=40, ha="right")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.legend(loc="upper left")


def draw(d: dict[str, Any]) -> Any:
    gib = 2**30
    labels = d["labels"]
    with style.context():
        fig, (ax_b, ax_m) = plt.subplots(1, 2, figsize=(15, 5.4), layout="constrained")
        _stacked(ax_b, d["bytes_by_kind"] / gib, KINDS, ["#1f77b4", "#2ca02c", "#d62728", "#ff7f0e"], labels)
        ax_b.set_title(f"Bytes each device sends per training step (busiest rank), n = {WORLD}")
        ax_b.set_ylabel("GiB per device per step")
        _stacked(ax_m, d["memory"] / gib, MEMORY, ["#7f7f7f", "#bcbd22", "#9467bd", "#17becf"], labels)
        ax_m.set_title("Memory per rank (AdamW; activations: the backward's tapes at their peak)")
        ax_m.set_ylabel("GiB per rank")
        for i, bubble in enumerate(d["bubble"]):
            if bubble:  # a pipeline: its idle fraction over its bar
                ax_m.annotate(f"bubble\n{bubble:.2f}", (i, d["memory"][i].sum() / gib), ha="center", va="bottom",
                              fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
        c = CONFIG
        fig.suptitle(
            f"The transformer's strategies (spec cost model = what transformer_step measures): L = {c.n_layers}, "
            f"D = {c.d_model}, N = {c.n_heads}, K = {c.n_kv_heads}, F = {c.d_ff} (SwiGLU), V = {c.vocab_size}, "
            f"B = {BATCH}, S = {SEQ}, {DTYPE}\npp: {MICROBATCHES} microbatches, the meshes' compositions at their "
            "default sizes (4 × 2 is dp 4, tp 2)"
        )
    return fig
