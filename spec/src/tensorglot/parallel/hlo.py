"""The collectives of a compiled XLA module, read from its text (``compiled.as_text()``): the bytes a
JAX program (or any other XLA front end's) really sends, to hold against the cost model.

Every all-reduce, all-gather, reduce-scatter and collective-permute (and their ``-start`` halves) with
its result shape and replica groups, in either of XLA's spellings of the groups (the iota form
``[2,2]<=[2,2]T(1,0)`` and the explicit ``{{0,2},{1,3}}``).
"""

from __future__ import annotations

import re

import numpy as np

from .cost import Collective

_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute)(?:-start)?\("
    r"(?P<operands>[^)]*)\)(?P<attrs>.*)$"
)
_ARRAY = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = dict.fromkeys(("pred", "s8", "u8"), 1) | dict.fromkeys(("s16", "u16", "f16", "bf16"), 2)
_BYTES |= dict.fromkeys(("s32", "u32", "f32"), 4) | dict.fromkeys(("s64", "u64", "f64"), 8)
_KIND = {
    "all-reduce": "all_reduce",
    "all-gather": "all_gather",
    "reduce-scatter": "reduce_scatter",
    "collective-permute": "send",
}


def _nbytes(text: str) -> int:
    return sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in _ARRAY.findall(text))


def replica_groups(attrs: str, n: int) -> list[list[int]]:
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs):  # iota form
        shape = [int(s) for s in m[1].split(",")]
        ids = np.arange(n).reshape([int(s) for s in m[2].split(",")])
        if m[3]:
            ids = ids.transpose([int(s) for s in m[3].split(",")])
        return ids.reshape(shape).tolist()
    if m := re.search(r"replica_groups=(\{(?:\{[\d,]*\},?)*\})", attrs):
        groups = [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m[1])]
        if groups and groups[0]:
            return groups
    return [list(range(n))]


def hlo_collectives(text: str, n: int) -> list[list[Collective]]:
    """Each device's collectives in a compiled HLO module's text: kind, full tensor bytes, group size.

    V is the full tensor: an all-reduce's or all-gather's result, a reduce-scatter's result times the
    group size (its operand), a collective-permute's tensor (sent once by each source of its pairs).
    The compiled text names operands without shapes, so every size comes from the result's shape.
    """
    per_device: list[list[Collective]] = [[] for _ in range(n)]
    for line in text.splitlines():
        if line.lstrip().startswith("ROOT"):
            line = line.replace("ROOT", "", 1)
        match = _OP.search(line)
        if not match:
            continue
        op, attrs = match["op"], match["attrs"]
        name = line.split("=")[0].strip()
        if op == "collective-permute":
            v = _nbytes(match["shape"])
            for src, _dst in re.findall(r"\{(\d+),(\d+)\}", attrs.split("source_target_pairs=")[1]):
                per_device[int(src)].append(Collective("send", name, v, 2))
            continue
        for group in replica_groups(attrs, n):
            v = _nbytes(match["shape"]) * (len(group) if op == "reduce-scatter" else 1)
            for d in group:
                per_device[d].append(Collective(_KIND[op], name, v, len(group)))
    return per_device
