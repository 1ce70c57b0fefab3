"""Pipeline schedules as data: the time table every backend's pp runtime walks and the figures draw.

GPipe (arXiv:1811.06965) runs every forward, then every backward; 1F1B (arXiv:2104.04473) runs p−i−1
warm-up forwards on stage i, then one forward and one backward in turn. With one slot per F and per B
both take 2(m+p−1) slots and idle (p−1)/(m+p−1) of the time; they differ in the activations held.
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEDULES = ("gpipe", "1f1b")


def pipeline_bubble(stages: int, microbatches: int, /) -> float:
    """The idle fraction of a GPipe or 1F1B schedule: (p−1)/(m+p−1).

    >>> pipeline_bubble(4, 4)
    0.42857142857142855
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"pipeline_bubble: stages and microbatches must be >= 1, got {stages}, {microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


def _stage_order(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which one stage runs its forwards and backwards."""
    m = microbatches
    if kind == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    # 1F1B: p−i−1 warm-up forwards, then one forward and one backward in turn, then the rest backward.
    warmup = min(stages - stage - 1, m)
    order = [("F", j) for j in range(warmup)]
    for k in range(m - warmup):
        order += [("F", warmup + k), ("B", k)]
    return order + [("B", k) for k in range(m - warmup, m)]


def pipeline_schedule(kind: str, stages: int, microbatches: int, /) -> list[tuple[int, int, str, int]]:
    """The pipeline's time table: ``(time_slot, stage, "F" | "B", microbatch)`` sorted by slot, stage.

    Each forward and backward takes one slot. A stage runs its ops in its schedule's order
    (GPipe: every forward, then every backward; 1F1B: p−i−1 warm-up forwards, then alternating), each as
    early as its inputs allow: F(i, j) after F(i−1, j); B(i, j) after B(i+1, j), and on the last stage
    after F(p−1, j). Both take 2(m+p−1) slots, m+p−1 per direction; they differ in the activations held
    (`activations_held`): GPipe m microbatches on every stage, 1F1B min(p−i, m) on stage i.

    >>> pipeline_schedule("gpipe", 2, 2)  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 'F', 0), (1, 0, 'F', 1), (1, 1, 'F', 0), (2, 1, 'F', 1),
     (3, 1, 'B', 0), (4, 0, 'B', 0), (4, 1, 'B', 1), (5, 0, 'B', 1)]
    >>> pipeline_schedule("1f1b", 2, 2)  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 'F', 0), (1, 0, 'F', 1), (1, 1, 'F', 0), (2, 1, 'B', 0),
     (3, 0, 'B', 0), (3, 1, 'F', 1), (4, 1, 'B', 1), (5, 0, 'B', 1)]
    """
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline_schedule: unknown kind {kind!r}, wanted one of {', '.join(SCHEDULES)}")
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
    """
    return 1 + max(t for t, _, _, _ in schedule)


def activations_held(schedule: Sequence[tuple[int, int, str, int]], stages: int, /) -> list[int]:
    """The peak number of microbatches whose activations each stage holds: from its F to its B.

    >>> activations_held(pipeline_schedule("gpipe", 4, 8), 4)
    [8, 8, 8, 8]
    >>> activations_held(pipeline_schedule("1f1b", 4, 8), 4)   # min(p − i, m)
    [4, 3, 2, 1]
    """
    held, peak = [0] * stages, [0] * stages
    for _, i, op, _ in sorted(schedule, key=lambda e: (e[0], e[2] == "B")):
        held[i] += 1 if op == "F" else -1
        peak[i] = max(peak[i], held[i])
    return peak
