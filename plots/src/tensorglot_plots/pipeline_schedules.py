"""GPipe and 1F1B as Gantt charts, drawn from `tensorglot.parallel.pipeline_schedule`'s time tables,
with the idle slots (the bubble) marked and checked against the spec's `pipeline_bubble`."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle

from tensorglot import parallel

from . import FigureSkipped, style

MEASURED: frozenset[str] = frozenset()
STAGES, MICROBATCHES = 4, 6
KINDS = {"gpipe": "GPipe", "1f1b": "1F1B"}


def idle_slots(table: list[tuple[int, int, str, int]], stages: int) -> list[tuple[int, int]]:
    """(slot, stage) pairs in which a stage does nothing, over the schedule's length."""
    busy = {(t, i) for t, i, _, _ in table}
    slots = 1 + max(t for t, _, _, _ in table)
    return [(t, i) for i in range(stages) for t in range(slots) if (t, i) not in busy]


def peak_activations(table: list[tuple[int, int, str, int]], stages: int) -> list[int]:
    """Per stage, the most microbatches whose activations it holds at once: from its F to its B."""
    held, peak = [0] * stages, [0] * stages
    for _, i, op, _ in sorted(table, key=lambda e: (e[0], e[2] == "B")):
        held[i] += 1 if op == "F" else -1
        peak[i] = max(peak[i], held[i])
    return peak


def data(backend: Any) -> dict[str, Any]:
    schedule = getattr(parallel, "pipeline_schedule", None)
    if schedule is None:
        raise FigureSkipped("pipeline_schedules: needs tensorglot.parallel.pipeline_schedule (the parallel issue)")
    tables = {kind: [tuple(e) for e in schedule(kind, STAGES, MICROBATCHES)] for kind in KINDS}
    out: dict[str, Any] = {
        "stages": STAGES,
        "microbatches": MICROBATCHES,
        "spec_bubble": parallel.pipeline_bubble(STAGES, MICROBATCHES),
    }
    for kind, table in tables.items():
        slots = 1 + max(t for t, _, _, _ in table)
        out[kind] = {
            "table": np.array([(t, i, 0 if op == "F" else 1, j) for t, i, op, j in table]),  # (ops, 4): F=0, B=1
            "slots": slots,
            "bubble": len(idle_slots(table, STAGES)) / (STAGES * slots),
            "peak_activations": np.array(peak_activations(table, STAGES)),
        }
    return out


def draw(d: dict[str, Any]) -> Any:
    p, m = d["stages"], d["microbatches"]
    fwd, bwd, idle = style.COLORS["forward"], style.COLORS["backward"], style.COLORS["idle"]
    with style.context():
        fig, axes = plt.subplots(
            len(KINDS), 1, figsize=(11, 0.5 * p * len(KINDS) + 2.2), layout="constrained", sharex=True
        )
        for ax, (kind, title) in zip(np.atleast_1d(axes), KINDS.items()):
            entry = d[kind]
            table = [(int(t), int(i), "B" if op else "F", int(j)) for t, i, op, j in entry["table"]]
            for t, i in idle_slots(table, p):
                ax.add_patch(Rectangle((t, i - 0.42), 1, 0.84, facecolor=idle, edgecolor="white", hatch="///", lw=0))
            for t, i, op, j in table:
                ax.add_patch(
                    Rectangle((t, i - 0.42), 1, 0.84, facecolor=fwd if op == "F" else bwd, edgecolor="white", lw=1)
                )
                ax.text(t + 0.5, i, f"{op}{j}", ha="center", va="center", color="white", fontsize=8, fontweight="bold")
            ax.set_xlim(0, entry["slots"])
            ax.set_ylim(p - 0.5, -0.5)
            ax.set_yticks(range(p), [f"stage {i}" for i in range(p)])
            ax.grid(False)
            held = ", ".join(str(v) for v in entry["peak_activations"])
            ax.set_title(
                f"{title}: {entry['slots']} slots, bubble {entry['bubble']:.1%} idle "
                f"(spec (p−1)/(m+p−1) = {d['spec_bubble']:.1%}); activations held per stage: {held}",
                loc="left",
                fontsize=10,
            )
        ax.set_xlabel("time slot (one forward or backward of one microbatch on one stage)")
        fig.legend(
            handles=[
                Patch(color=fwd, label="forward Fj of microbatch j"),
                Patch(color=bwd, label="backward Bj"),
                Patch(facecolor=idle, hatch="///", label="idle (bubble)"),
            ],
            loc="outside lower center",
            ncol=3,
        )
        fig.suptitle(
            f"Pipeline schedules: p = {p} stages, m = {m} microbatches "
            "— the same bubble, fewer activations held in 1F1B"
        )
    return fig
