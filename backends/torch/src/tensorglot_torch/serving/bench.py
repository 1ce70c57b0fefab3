"""Serving rows for the torch bench table: disaggregated vs colocated on one mixed workload.

The workload: short chat requests that decode for a while, and long prompts arriving while they do
(the case disaggregation is for: a colocated server stalls every decoding request for each long
prefill). Both modes run the same requests on the same machine in this run; rows are ratios
disaggregated ÷ colocated (times: lower is better; tokens/s: higher is better) plus the transfer share
of TTFT. On a CPU box the processes share the same cores, so read the ratios as what they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

import tensorglot
from tensorglot.bench import Row
from tensorglot.serving import DEMO_MODEL, Model, Request, serve


def mixed_workload(config: dict[str, Any], *, quick: bool, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    V = config["vocab_size"]
    chats, longs, long_len, new = (4, 2, 192, 24) if quick else (8, 4, 384, 48)
    reqs = [Request(i, rng.integers(0, V, size=16), new, arrival_s=0.0) for i in range(chats)]
    for j in range(longs):  # long prompts land while the chats decode
        reqs.append(Request(chats + j, rng.integers(0, V, size=long_len), 4, arrival_s=0.05 * (j + 1)))
    return reqs


def run_modes(backend: str, *, quick: bool) -> dict[str, dict[str, Any]]:
    model = Model(backend, DEMO_MODEL, seed=0)
    out = {}
    for name, kwargs in (("colocated", {"colocated": True}), ("disaggregated", {"prefill_workers": 1})):
        out[name] = serve(mixed_workload(DEMO_MODEL, quick=quick), model, **kwargs)
    a, b = out["disaggregated"]["requests"], out["colocated"]["requests"]
    if [r["tokens"] for r in a] != [r["tokens"] for r in b]:
        raise RuntimeError("serving bench: disaggregated and colocated generated different tokens")
    return {k: v["summary"] for k, v in out.items()}


def serving_rows(*, quick: bool = False, backend: str | None = None) -> Iterable[Row]:
    name = backend or ("torch" if "torch" in tensorglot.available_backends() else "numpy")
    s = run_modes(name, quick=quick)
    d, c = s["disaggregated"], s["colocated"]
    sizes = {"backend": name, "requests": d["requests"], "prefill_workers": 1}
    for key, label in (
        ("ttft_p50_s", "TTFT p50"),
        ("ttft_p99_s", "TTFT p99"),
        ("tpot_p50_s", "TPOT p50"),
        ("tpot_p99_s", "TPOT p99"),
    ):
        ratio = d[key] / c[key]
        note = f"colocated {1e3 * c[key]:.2f} ms"
        if key == "tpot_p99_s":  # the claim: decode stays steady while long prompts arrive
            yield Row(f"serving {label} disagg/coloc", d[key], "s", ratio, "<= 1", ratio <= 1, sizes, note)
        else:
            yield Row(f"serving {label} disagg/coloc", d[key], "s", ratio, None, None, sizes, note)
    tps = d["tokens_per_s"] / c["tokens_per_s"]
    yield Row("serving tokens/s disagg/coloc", d["tokens_per_s"], "tokens/s", tps, None, None, sizes,
              f"colocated {c['tokens_per_s']:.1f} tokens/s; ratio: higher is better")  # fmt: skip
    yield Row("serving transfer share of TTFT p50", d["transfer_share_of_ttft_p50"], "fraction",
              None, None, None, sizes, "KV transfer time / TTFT, disaggregated")  # fmt: skip


def rows(*, quick: bool = False) -> Iterable[Row]:
    return serving_rows(quick=quick)
