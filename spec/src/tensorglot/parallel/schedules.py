"""Pipeline schedules as data: the time table every backend's pp runtime walks and the figures draw.

GPipe (arXiv:1811.06965) runs every forward, then every backward; 1F1B (arXiv:2104.04473) runs p−i−1
warm-up forwards on stage i, then one forward and one backward in turn. With one slot per F and per B
both take 2(m+p−1) slots and idle (p−1)/(m+p−1) of the time; they differ in the activations held.
ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv:2401.10241 §3.1) splits the backward into B
(the input gradient, what the previous stage waits for) and W (the weight gradients, which nothing
waits for), one slot each as the paper's T_F = T_B = T_W: stage i runs 1F1B's order of F and B and
defers each W by i microbatches, so the last stages send their B's first and fill the cool-down with
W's. With m >= p it takes 3m + p − 1 slots against 1F1B's 3(m + p − 1) in the same units: a bubble of
(p−1)/(3m+p−1), a third of 1F1B's, for at most p microbatches held per stage (1F1B's stage 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SCHEDULES = ("gpipe", "1f1b")  # the MLP step's; the transformer's add "interleaved" and ZB-H1
ZERO_BUBBLE = "zb_h1"


def pipeline_bubble(stages: int, microbatches: int, /) -> float:
    """The idle fraction of a GPipe or 1F1B schedule: (p−1)/(m+p−1).

    >>> pipeline_bubble(4, 4)
    0.42857142857142855
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"pipeline_bubble: stages and microbatches must be >= 1, got {stages}, {microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


def _stage_order(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which one stage runs its forwards and backwards (and ZB-H1's weight gradients)."""
    m = microbatches
    if kind == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    # 1F1B: p−i−1 warm-up forwards, then one forward and one backward in turn, then the rest backward.
    warmup = min(stages - stage - 1, m)
    order = [("F", j) for j in range(warmup)]
    for k in range(m - warmup):
        order += [("F", warmup + k), ("B", k)]
    order += [("B", k) for k in range(m - warmup, m)]
    if kind != ZERO_BUBBLE:
        return order
    # ZB-H1: W(k − i) right after B(k); stage i's last i W's after its last B.
    lag, out, w = min(stage, m), [], 0
    for op, j in order:
        out.append((op, j))
        if op == "B" and j >= lag:
            out.append(("W", j - lag))
            w += 1
    return out + [("W", k) for k in range(w, m)]


def pipeline_schedule(kind: str, stages: int, microbatches: int, /) -> list[tuple[int, int, str, int]]:
    """The pipeline's time table: ``(time_slot, stage, "F" | "B" | "W", microbatch)`` sorted by slot, stage.

    Each forward and backward takes one slot (``zb_h1``: each F, B and W, see the module). A stage runs
    its ops in its schedule's order (GPipe: every forward, then every backward; 1F1B: p−i−1 warm-up
    forwards, then alternating), each as early as its inputs allow: F(i, j) after F(i−1, j); B(i, j)
    after B(i+1, j), and on the last stage after F(p−1, j); W(i, j) after B(i, j). GPipe and 1F1B take
    2(m+p−1) slots, m+p−1 per direction; they differ in the activations held (`activations_held`):
    GPipe m microbatches on every stage, 1F1B min(p−i, m) on stage i.

    >>> pipeline_schedule("gpipe", 2, 2)  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 'F', 0), (1, 0, 'F', 1), (1, 1, 'F', 0), (2, 1, 'F', 1),
     (3, 1, 'B', 0), (4, 0, 'B', 0), (4, 1, 'B', 1), (5, 0, 'B', 1)]
    >>> pipeline_schedule("1f1b", 2, 2)  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 'F', 0), (1, 0, 'F', 1), (1, 1, 'F', 0), (2, 1, 'B', 0),
     (3, 0, 'B', 0), (3, 1, 'F', 1), (4, 1, 'B', 1), (5, 0, 'B', 1)]
    >>> [f"{op}{j}" for _, i, op, j in pipeline_schedule("zb_h1", 2, 2) if i == 1]  # W's deferred by 1
    ['F0', 'B0', 'F1', 'B1', 'W0', 'W1']
    """
    kinds = (*SCHEDULES, ZERO_BUBBLE)
    if kind not in kinds:
        raise ValueError(f"pipeline_schedule: unknown kind {kind!r}, wanted one of {', '.join(kinds)}")
    for name, value in (("stages", stages), ("microbatches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline_schedule: {name} must be a positive int, got {value!r}")
    p = stages
    orders = [_stage_order(kind, i, p, microbatches) for i in range(p)]
    done: dict[tuple[str, int, int], int] = {}  # (op, stage, microbatch) -> slot
    table: list[tuple[int, int, str, int]] = []
    next_op = [0] * p
    slot = 0
    while any(next_op[i] < len(orders[i]) for i in range(p)):
        for i in range(p):
            if next_op[i] == len(orders[i]):
                continue
            op, j = orders[i][next_op[i]]
            if op == "F":
                needs = [("F", i - 1, j)] if i > 0 else []
            elif op == "W":
                needs = [("B", i, j)]
            else:
                needs = [("B", i + 1, j)] if i < p - 1 else [("F", i, j)]
            if all(done.get(d, slot) < slot for d in needs):
                table.append((slot, i, op, j))
                next_op[i] += 1
        for t, i, op, j in table:
            if t == slot:
                done[(op, i, j)] = slot
        slot += 1
    return table


def schedule_slots(schedule: Sequence[tuple[int, int, str, int]], /) -> int:
    """How many time slots a schedule takes.

    >>> schedule_slots(pipeline_schedule("gpipe", 4, 8))   # 2(m+p−1)
    22
    >>> schedule_slots(pipeline_schedule("zb_h1", 4, 8))   # 3m + p − 1, one slot per F, B and W
    27
    """
    return 1 + max(t for t, _, _, _ in schedule)


def activations_held(schedule: Sequence[tuple[int, int, str, int]], stages: int, /) -> list[int]:
    """The peak number of microbatches whose activations each stage holds: from its F to its B (with
    ZB-H1's W's: to its W, which keeps part of them, the inputs and output gradients of its linears).

    >>> activations_held(pipeline_schedule("gpipe", 4, 8), 4)
    [8, 8, 8, 8]
    >>> activations_held(pipeline_schedule("1f1b", 4, 8), 4)   # min(p − i, m)
    [4, 3, 2, 1]
    >>> activations_held(pipeline_schedule("zb_h1", 4, 8), 4)   # min(p − i, m) + i
    [4, 4, 4, 4]
    """
    split = any(op == "W" for _, _, op, _ in schedule)
    held, peak = [0] * stages, [0] * stages
    for _, i, op, _ in sorted(schedule, key=lambda e: e[0]):
        held[i] += 1 if op == "F" else -1 if op == ("W" if split else "B") else 0
        peak[i] = max(peak[i], held[i])
    return peak


def slot_program(rows: Sequence[tuple], stages: int, /, *, branch: Callable[[tuple], Any] = lambda row: row[2]) -> Any:
    """A schedule as data for one traced SPMD program, which cannot branch on its rank in Python.

    ``rows`` are a schedule's ``(slot, stage, op, microbatch, ...)``; ``branch(row)`` names the code a row
    runs (its op by default). Returns ``(codes, micro, branches, sends)``: ``codes`` (slots, stages) the
    index into ``branches`` each stage runs in each slot (0: ``"idle"``), ``micro`` the microbatch it
    runs it on, and ``sends[t]`` for F's activations forward and B's gradients back in slot t, each
    ``(pairs, into)``: the (source, destination, microbatch) of every transfer, and the microbatch each
    stage receives (−1: none).

    >>> codes, micro, branches, sends = slot_program(pipeline_schedule("gpipe", 2, 2), 2)
    >>> branches, codes[:3].tolist(), sends[1]
    (['idle', 'F', 'B'], [[1, 0], [1, 1], [0, 1]], (([(0, 1, 1)], [-1, 1]), ([], [-1, -1])))
    """
    slots = 1 + max(row[0] for row in rows)
    branches: list[Any] = ["idle"]
    codes, micro = np.zeros((slots, stages), np.int32), np.zeros((slots, stages), np.int32)
    sends: list[tuple[tuple[list, list], tuple[list, list]]] = []
    by_slot: dict[int, list[tuple]] = {}
    for row in rows:
        by_slot.setdefault(row[0], []).append(row)
    for t in range(slots):
        here = by_slot.get(t, [])
        for row in here:
            if branch(row) not in branches:
                branches.append(branch(row))
            codes[t, row[1]], micro[t, row[1]] = branches.index(branch(row)), row[3]
        slot = []
        for op, step in (("F", 1), ("B", -1)):
            pairs = [(row[1], row[1] + step, row[3]) for row in here if row[2] == op and 0 <= row[1] + step < stages]
            into = [-1] * stages
            for _, dst, j in pairs:
                into[dst] = j
            slot.append((pairs, into))
        sends.append((slot[0], slot[1]))
    return codes, micro, branches, sends
