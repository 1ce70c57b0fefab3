"""Goodput and SLO attainment against the arrival rate, disaggregated and colocated with chunked prefill,
from a ``tensorglot bench serve --json`` sweep (`tensorglot.serving.sweep`).

A sweep takes minutes, so the figure draws a measured sweep committed beside this module
(``data/serving_goodput.json``, the run docs/serving.md quotes); ``TENSORGLOT_GOODPUT_JSON=PATH`` draws
another. The backend the figure is asked for does not run anything: the sweep names its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style

SWEEP = Path(__file__).with_name("data") / "serving_goodput.json"
#: every number is measured (on the machine of the sweep, not the backend the figure is drawn with)
MEASURED = frozenset({"rates", "goodput", "attainment", "goodput_runs", "attainment_runs", "ttft_p99", "tpot_p99",
                      "labels", "slo", "workload", "machine", "best_ratio"})  # fmt: skip
MARKERS = {"colocated": "o", "1p1d": "s", "2p1d": "^", "url": "D"}


def load(path: str | Path | None = None) -> dict[str, Any]:
    """The sweep at ``path`` (default: ``TENSORGLOT_GOODPUT_JSON``, else the committed one)."""
    path = Path(path or os.environ.get("TENSORGLOT_GOODPUT_JSON") or SWEEP)
    try:
        sweep = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"serving_goodput: cannot read the sweep {path}: {exc}") from None
    if sweep.get("schema") != "tensorglot.bench.serve/1":
        raise ValueError(f"serving_goodput: {path} is not a tensorglot bench serve sweep: {sweep.get('schema')!r}")
    return sweep


def data(backend: Any) -> dict[str, Any]:
    sweep = load()
    modes = list(sweep["modes"])

    def per_mode(key: str) -> dict[str, np.ndarray]:
        return {m: np.array([r[key] for r in sweep["rows"] if r["mode"] == m], dtype=np.float64) for m in modes}

    def runs(key: str) -> dict[str, np.ndarray]:  # (rates, runs): every run's value, one column without repeats
        return {m: np.array([r["runs"][key] if "runs" in r else [r[key]] for r in sweep["rows"] if r["mode"] == m],
                            dtype=np.float64) for m in modes}  # fmt: skip

    rates = per_mode("rate")
    return {
        "goodput_runs": runs("goodput_rps"),
        "attainment_runs": runs("slo_attainment"),
        "rates": rates,
        "goodput": per_mode("goodput_rps"),
        "attainment": per_mode("slo_attainment"),
        "ttft_p99": per_mode("ttft_p99_s"),
        "tpot_p99": per_mode("tpot_p99_s"),
        "labels": dict(sweep["modes"]),
        "slo": dict(sweep["slo"]),
        "workload": dict(sweep["workload"]),
        "machine": dict(sweep["machine"]),
        "best_ratio": dict(sweep["best_ratio"]),
    }


def draw(d: dict[str, Any]) -> Any:
    slo, w, machine = d["slo"], d["workload"], d["machine"]
    top = max(float(r.max()) for r in d["rates"].values())
    with style.context():
        fig, (good, attain) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
        good.plot([0, top], [0, top], color=style.COLORS["idle"], linestyle="--", label="the arrival rate")
        for mode, rates in d["rates"].items():
            label, marker = d["labels"][mode], MARKERS.get(mode, "o")
            (line,) = good.plot(rates, d["goodput"][mode], marker=marker, label=label)
            attain.plot(rates, 100 * d["attainment"][mode], marker=marker, label=label, color=line.get_color())
            if d["goodput_runs"][mode].shape[1] > 1:  # every run's value, faint, around the median
                for ax, runs in ((good, d["goodput_runs"][mode]), (attain, 100 * d["attainment_runs"][mode])):
                    ax.plot(np.repeat(rates, runs.shape[1]), runs.ravel(), marker, color=line.get_color(), alpha=0.25)
        k = next(iter(d["goodput_runs"].values())).shape[1]
        each = f" (median of {k} runs, each run faint)" if k > 1 else ""
        good.set_title(f"goodput: requests/s that meet both targets{each}")
        good.set_ylabel("goodput (requests/s)")
        attain.set_title("SLO attainment")
        attain.set_ylabel("requests that meet both targets (%)")
        attain.axhline(90, color=style.COLORS["idle"], linestyle=":", label="90 %")
        attain.set_ylim(0, 105)
        for ax in (good, attain):
            ax.set_xlabel("arrival rate (requests/s, Poisson)")
            ax.set_xlim(0, top * 1.05)
        good.set_ylim(bottom=0)
        best = [(d["labels"][m], r) for m, r in d["best_ratio"].items() if r is not None]
        ratios = "\n".join(f"{name} ÷ colocated: {r:.2f}" for name, r in best)
        good.legend(title=f"best goodput over the sweep,\n{ratios}" if ratios else None, loc="upper left")
        attain.legend(loc="lower left")
        fig.suptitle(
            f"Goodput at TTFT ≤ {1e3 * slo['ttft_s']:.0f} ms and TPOT ≤ {1e3 * slo['tpot_s']:.0f} ms: "
            f"disaggregated vs colocated with chunked prefill"
        )
        lo, hi = w["prompt_len"]
        who = f"{w['backend']} backend, {w['model']}" if "backend" in w else f"the server at {w['url']}, {w['model']}"
        runs = machine.get("loadavg_runs", [machine["loadavg_before"][0], machine["loadavg_after"][0]])
        load = f"{min(runs):.0f}–{max(runs):.0f}" if round(min(runs)) != round(max(runs)) else f"~{runs[0]:.0f}"
        fig.text(
            0.5, -0.02,
            f"{who}; {w['requests']} requests per rate, prompts of {lo}–{hi} tokens, "
            f"{w['max_tokens']} new tokens each, seed {w['seed']}; one thread per process; {machine['cpus']} CPUs "
            f"at load average {load} ({machine['date'][:10]})",
            ha="center", va="top", fontsize=8.5,
        )  # fmt: skip
    return fig
