"""Attention masks as the backend builds and applies them: bottom-right causal with a KV offset,
right padding, and which KV head each query head reads under grouped-query attention."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from . import style

MEASURED: frozenset[str] = frozenset()
QUERIES, KEYS = 4, 10  # decoding 4 new tokens after 6 cached ones
LENGTHS = (3, 7, 5, 10)
QUERY_HEADS, KV_HEADS = 8, 2


def data(backend: Any) -> dict[str, Any]:
    ops = backend.ops
    causal = backend.to_numpy(ops.causal_mask(QUERIES, KEYS))  # (S, T)
    padding = backend.to_numpy(ops.padding_mask(backend.asarray(np.array(LENGTHS), "int64"), KEYS))  # (B, 1, 1, T)
    # One key; kv head j's value is the one-hot e_j, so query head h outputs e_(kv head it reads).
    k = np.zeros((1, 1, KV_HEADS, KV_HEADS), np.float32)  # (B, T, K, H=K)
    v = np.eye(KV_HEADS, dtype=np.float32)[None, None]  # (B, T, K, H=K)
    q = np.zeros((1, 1, QUERY_HEADS, KV_HEADS), np.float32)  # (B, S, N, H)
    out = ops.attention(backend.asarray(q, "float32"), backend.asarray(k, "float32"), backend.asarray(v, "float32"))
    head_map = np.asarray(backend.to_numpy(out), np.float64).reshape(QUERY_HEADS, KV_HEADS)  # (N, K)
    return {
        "causal": np.asarray(causal, bool),
        "padding": np.asarray(padding, bool).reshape(len(LENGTHS), KEYS),  # (B, T)
        "lengths": np.array(LENGTHS),
        "head_map": head_map,
    }


def _grid(ax: Any, shape: tuple[int, int]) -> None:
    ax.grid(False)
    ax.set_xticks(np.arange(shape[1]))
    ax.set_yticks(np.arange(shape[0]))
    ax.set_xticks(np.arange(shape[1] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(shape[0] + 1) - 0.5, minor=True)
    ax.grid(True, which="minor", color="white", lw=1.5, alpha=1)
    ax.tick_params(which="minor", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw(d: dict[str, Any]) -> Any:
    cmap = ListedColormap(["#e8e8e8", "#1f77b4"])
    causal, padding, head_map = d["causal"], d["padding"], d["head_map"]
    s, t = causal.shape
    with style.context():
        fig, (ax_c, ax_p, ax_g) = plt.subplots(
            1, 3, figsize=(13, 4.3), layout="constrained", gridspec_kw={"width_ratios": [t, t, 5]}
        )
        ax_c.imshow(causal, cmap=cmap, vmin=0, vmax=1)
        _grid(ax_c, causal.shape)
        ax_c.set_title(f"Causal, bottom-right: S = {s} queries, T = {t} keys")
        ax_c.set_xlabel(f"key position j (token; first {t - s} are cached)")
        ax_c.set_ylabel("query i (token)")
        ax_c.axvline(t - s - 0.5, color="#d62728", lw=2, ls="--")
        ax_c.text(t - s - 0.6, -0.75, f"KV offset T − S = {t - s}", color="#d62728", ha="right", fontsize=8.5)
        ax_c.set_ylim(s - 0.5, -1.1)

        ax_p.imshow(padding, cmap=cmap, vmin=0, vmax=1)
        _grid(ax_p, padding.shape)
        ax_p.set_yticks(np.arange(len(d["lengths"])), [f"{b}: len {n}" for b, n in enumerate(d["lengths"])])
        ax_p.set_title("Padding: True for the first lengths[b] keys")
        ax_p.set_xlabel("key position j (token)")
        ax_p.set_ylabel("sequence b in the batch")

        ax_g.imshow(head_map, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        _grid(ax_g, head_map.shape)
        n, k = head_map.shape
        ax_g.set_title(f"GQA: N = {n} → K = {k} heads")
        ax_g.set_xlabel("KV head read (h // (N/K))")
        ax_g.set_ylabel("query head h")
        fig.suptitle(
            "Attention masks (blue = may attend), computed by the backend's causal_mask, padding_mask and attention"
        )
    return fig
