"""Interleaved 1F1B (Narayanan et al., arXiv:2104.04473 §2.2): each of p devices holds v chunks of the
layers, virtual stage c·p + i being chunk c of device i, so a microbatch goes round the devices v times.

The table has one row per op, ``(time_slot, device, "F" | "B", microbatch, chunk)``, each op one slot
of a chunk's work (1/v of a plain stage's). A device runs Megatron's order: microbatches in groups of p,
forwards chunk by chunk within a group (backwards chunk by chunk in reverse), (p − i − 1)·2 + (v − 1)·p
warm-up forwards, then one forward and one backward in turn; each op as early as its inputs allow, as
`pipeline_schedule` places them. The bubble falls from (p−1)/(m+p−1) to about (p−1)/(v·m+p−1).
"""

from __future__ import annotations

from collections.abc import Sequence

Row = tuple[int, int, str, int, int]


def _device_order(i: int, p: int, m: int, v: int) -> list[tuple[str, int, int]]:
    forwards = [(j, c) for g in range(m // p) for c in range(v) for j in range(g * p, (g + 1) * p)]
    backwards = [(j, c) for g in range(m // p) for c in reversed(range(v)) for j in range(g * p, (g + 1) * p)]
    warmup = min((p - i - 1) * 2 + (v - 1) * p, m * v)
    order = [("F", j, c) for j, c in forwards[:warmup]]
    steady = forwards[warmup:]
    for k, (j, c) in enumerate(steady):
        order += [("F", j, c), ("B", *backwards[k])]
    return order + [("B", j, c) for j, c in backwards[len(steady) :]]


def interleaved_schedule(stages: int, microbatches: int, chunks: int, /) -> list[Row]:
    """The interleaved 1F1B table on ``stages`` devices of ``chunks`` chunks each.

    >>> rows = interleaved_schedule(2, 2, 2)
    >>> 1 + max(r[0] for r in rows), 1 + max(r[0] for r in interleaved_schedule(2, 2, 1))  # chunk slots
    (10, 6)
    """
    p, m, v = stages, microbatches, chunks
    for name, value in (("stages", p), ("microbatches", m), ("chunks", v)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"interleaved_schedule: {name} must be a positive int, got {value!r}")
    if m % p:
        raise ValueError(f"interleaved_schedule: microbatches = {m} must be a multiple of stages = {p}")
    last = p * v - 1  # the last virtual stage
    orders = [_device_order(i, p, m, v) for i in range(p)]
    done: dict[tuple[str, int, int], int] = {}  # (op, virtual stage, microbatch) -> slot
    table: list[Row] = []
    at, slot = [0] * p, 0
    while any(at[i] < len(orders[i]) for i in range(p)):
        ran = []
        for i in range(p):
            if at[i] == len(orders[i]):
                continue
            op, j, c = orders[i][at[i]]
            vs = c * p + i
            if op == "F":
                needs = [("F", vs - 1, j)] if vs > 0 else []
            else:
                needs = [("B", vs + 1, j)] if vs < last else [("F", vs, j)]
            if all(done.get(d, slot) < slot for d in needs):
                ran.append(((op, vs, j), (slot, i, op, j, c)))
                at[i] += 1
        if not ran and slot > 4 * (m * v + p) * 2:
            raise RuntimeError(f"interleaved_schedule: no op can run at slot {slot} (p={p}, m={m}, v={v})")
        for key, row in ran:
            done[key] = slot
            table.append(row)
        slot += 1
    return table


def interleaved_held(table: Sequence[Row], stages: int, /) -> list[int]:
    """The peak number of (microbatch, chunk) activations each device holds, from its F to its B."""
    held, peak = [0] * stages, [0] * stages
    for _, i, op, _, _ in sorted(table, key=lambda e: (e[0], e[2] == "B")):
        held[i] += 1 if op == "F" else -1
        peak[i] = max(peak[i], held[i])
    return peak
