"""The cost model of a transformer training step: what each rank sends, collective by collective, what it
keeps, and for pipelines the slots and the bubble, by the ring conventions of `cost`.

With P_k one parameter's bytes, A = B·S·D·itemsize one residual-stream activation, n ranks (per step):
  * dp: all-reduce every gradient, 2(n−1)/n·ΣP_k; zero1 and zero2 the same bytes as a reduce-scatter
    of each gradient and an all-gather of each updated parameter; fsdp adds a second all-gather (each
    unit before its backward, the embedding excepted: its backward reads no weight), 3(n−1)/n·ΣP_k
    less the embedding's backward gather.
  * tp: four all-reduces of A per block (two forward, two backward), 8L(n−1)/n·A, plus, when K < n,
    an all-reduce of each replicated K/V weight's gradient among its n/K ranks; tp_sp: the same bytes
    as all-gathers and reduce-scatters, plus an all-reduce of every replicated weight's gradient.
  * pp: each stage sends a (B/m, S, D) activation per microbatch forward and its gradient back.

Memory per rank: parameters kept between steps, gradients held after the backward, optimizer state
(AdamW: 2 arrays per parameter element the rank updates), and activations: the tapes every unit keeps
from its forward to its backward, all alive as the backward starts. A block's tape holds the stream x
and h at the rank's s_r positions, the sublayer inputs a and m, and q, y (N_r heads), k, v (K_r kv
heads) at its s_i positions; the head's x, n (D) and logits (V) at s_r. With b samples per rank:
    L · b·(2·s_r·D + s_i·(2D + 2·N_r·H + 2·K_r·H)) + b·s_r·(2D + V), times the itemsize, where
  * dp, zero1, zero2, fsdp: b = B/n, s_r = s_i = S, N_r = N, K_r = K (the whole local batch's);
  * tp (dp_tp, fsdp_tp: b = B/d): N_r = N/t, K_r = max(K/t, 1) (heads and columns split; the stream
    and the sublayer inputs are whole);
  * tp_sp: s_r = S/t (norms and the stream sequence-split), s_i = S (a sublayer's gathered input);
  * cp: s_r = s_i = S/n (the ring's log-sum-exp, (B, N, S/n) per layer, is not counted);
  * pipelines: the peak over a device's schedule (`_tape_peaks`), one microbatch's tape per F held.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..param_layout import GATED
from ..params import TransformerConfig, param_shapes
from .cost import Collective
from .schedules import activations_held
from .step import ITEMSIZE
from .transformer import Traffic
from .transformer_blocks import block_names, head_names
from .transformer_checks import check_chunks, check_transformer_step
from .transformer_optim import OPTIMIZERS
from .transformer_ring import cp_ring_bytes
from .transformer_shards import device_names, pipeline_table, tp_where


@dataclass(frozen=True)
class TransformerCost(Traffic):
    """What the model predicts for one step: ``collectives`` are the busiest rank's, in issue order."""

    strategy: str
    world_size: int
    collectives: tuple[Collective, ...]
    bytes_by_rank: tuple[int, ...]
    param_bytes_per_rank: int
    grad_bytes_per_rank: int
    optimizer_bytes_per_rank: int
    bubble: float = 0.0  # pp: the idle fraction (p−1)/(m+p−1)
    slots: int = 0  # pp: the schedule's time slots
    activations_held: tuple[int, ...] = ()  # pp: the peak microbatches of activations each stage holds
    activation_bytes_by_stage: tuple[int, ...] = ()  # pp: the peak bytes of the tapes each device keeps
    activation_bytes_per_rank: int = 0  # the peak bytes of the tapes (ZB-H1: and W's buffers) a rank keeps


def transformer_cost(
    strategy: str,
    config: TransformerConfig,
    batch: int,
    seq: int,
    world_size: int,
    *,
    microbatches: int | None = None,
    schedule: str = "1f1b",
    chunks: int | None = None,
    tp_size: int | None = None,
    pp_size: int | None = None,
    dtype: str = "float32",
    optimizer: str = "sgd",
) -> TransformerCost:
    """The collectives, bytes and memory of one step of ``strategy`` (`transformer_step`'s options).

    >>> cfg = TransformerConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=16)
    >>> c = transformer_cost("tp", cfg, 4, 8, 2)   # 8 all-reduces of A = 4·8·8·4 bytes, 2(n−1)/n = 1
    >>> c.bytes_per_device, c.bytes_by_kind
    (8192, {'all_reduce': 8192})
    """
    m, tp, pp = check_transformer_step(
        config, batch, seq, strategy, world_size, microbatches=microbatches, schedule=schedule,
        tp_size=tp_size, pp_size=pp_size,
    )  # fmt: skip
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"transformer_cost: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    n, c, item = world_size, config, ITEMSIZE[dtype]
    d = n // (tp * pp)  # the dp size of the meshes (1 for tp, tp_sp, tp_pp and pp)
    size = {k: math.prod(s) * item for k, s in param_shapes(c).items()}
    total = sum(size.values())
    state_arrays = 2 if optimizer == "adamw" else 0
    log: list[Collective] = []  # every rank's but pp's, which fills `by_rank`

    def ar(tensor: str, v: int, group: int = n) -> None:
        log.append(Collective("all_reduce", tensor, v, group))

    def ag(tensor: str, v: int) -> None:
        log.append(Collective("all_gather", tensor, v, n))

    def rs(tensor: str, v: int) -> None:
        log.append(Collective("reduce_scatter", tensor, v, n))

    names = list(size)
    if strategy in ("dp", "zero1", "zero2", "fsdp"):
        if strategy == "dp":
            for k in reversed(names):
                ar(f"{k} grad", size[k])
        elif strategy == "zero1":
            for k in reversed(names):
                rs(f"{k} grad", size[k])
            for k in reversed(names):
                ag(k, size[k])
        else:
            _walk_fsdp(c, size, log, n, gather=strategy == "fsdp")
            if strategy == "zero2":
                for k in names:
                    ag(k, size[k])
        kept = total if strategy != "fsdp" else total // n
        grads = total if strategy in ("dp", "zero1") else total // n
        updated = total if strategy == "dp" else total // n
        tapes = _tapes(c, batch // n, seq, seq, 1, item)
        return _result(strategy, n, [log] * n, kept, grads, state_arrays * updated, tapes)
    if strategy == "cp":
        _walk_cp(c, size, batch, seq, n, item, log)
        tapes = _tapes(c, batch, seq // n, seq // n, 1, item)
        return _result(strategy, n, [log] * n, total, total, state_arrays * total, tapes)
    local = {k: size[k] if tp_where(k, c, tp, 0) is None else size[k] // _tp_parts(k, c, tp) for k in names}
    if strategy == "fsdp_tp":
        kept = sum(local.values()) // d
        _walk_fsdp(c, local, log, d, gather=True, act=batch // d * seq * c.d_model * item, t=tp)
        tapes = _tapes(c, batch // d, seq, seq, tp, item)
        return _result(strategy, n, [log] * n, kept, kept, state_arrays * kept, tapes)
    if strategy in ("tp", "tp_sp", "dp_tp"):
        act = batch // d * seq * c.d_model * item
        kept = sum(local.values())
        _walk_tp(c, size, local, act, tp, d, strategy == "tp_sp", log)
        tapes = _tapes(c, batch // d, seq // tp if strategy == "tp_sp" else seq, seq, tp, item)
        return _result(strategy, n, [log] * n, kept, kept, state_arrays * kept, tapes)
    v = check_chunks(c, schedule, pp, m, chunks)
    micro = batch // d // m * seq * c.d_model * item
    return _pipeline(strategy, c, local, micro, schedule, m, tp, pp, d, v, state_arrays)


def _pipeline(strategy: str, c: TransformerConfig, local: dict, micro: int, schedule: str, m: int, t, p, d, v, state):
    """A pipeline's ranks (rank = replica·(p·t) + stage·t + tp_index): each device's sends in its table's
    order with, when t > 1, its blocks' tp all-reduces of the (B/(d·m), S, D) microbatch between them;
    then (K < t) the shared K/V gradients and (d > 1) the device's gradient bucket down its column."""
    v, table = pipeline_table(schedule, p, m, v)
    by_stage: list[list[Collective]] = [[] for _ in range(p)]
    per, last = c.n_layers // (p * v), p * v - 1
    for _, i, op, j, ch in table:
        vs = ch * p + i
        blocks = range(vs * per, (vs + 1) * per)
        ops = by_stage[i]
        if op == "W":  # ZB-H1's weight gradients: nothing to send
            continue
        if op == "F":
            for b in blocks if t > 1 else ():
                ops += [Collective("all_reduce", f"layers.{b}.{sub} output", micro, t) for sub in ("attention", "mlp")]
            if vs < last:
                ops.append(Collective("send", f"microbatch {j} activation", micro, 2))
            continue
        for b in reversed(blocks) if t > 1 else ():
            ops += [Collective("all_reduce", f"layers.{b}.{sub} input grad", micro, t) for sub in ("mlp", "attention")]
        if vs > 0:
            ops.append(Collective("send", f"microbatch {j} grad", micro, 2))
    stages = [device_names(c, i, p, v) for i in range(p)]
    for i, ops in enumerate(by_stage):
        if c.n_kv_heads % t:
            kv = [k for k in stages[i] if k.endswith((".wk", ".wv"))]
            ops += [Collective("all_reduce", f"{k} grad", local[k], t // c.n_kv_heads) for k in kv]
        if d > 1:
            ops.append(Collective("all_reduce", f"stage {i} grads", sum(local[k] for k in stages[i]), d))
    kept = max(sum(local[k] for k in own) for own in stages)
    n = d * p * t
    out = _result(strategy, n, [by_stage[r // t % p] for r in range(n)], kept, kept, state * kept)
    slots = 1 + max(row[0] for row in table)
    held = tuple(activations_held([row[:4] for row in table], p))
    tapes = _tape_peaks(c, table, p, v, t, micro)
    bubble = 1 - len(table) / (p * slots)  # every device runs the same number of ops, one slot each
    out = dataclasses.replace(out, bubble=bubble, slots=slots, activations_held=held)
    return dataclasses.replace(out, activation_bytes_by_stage=tapes, activation_bytes_per_rank=max(tapes))


def _tapes(c: TransformerConfig, b: int, s_r: int, s_i: int, t: int, item: int) -> int:
    """The bytes of every unit's tape on a rank of b samples (see the module's formula)."""
    D, H = c.d_model, c.head_dim
    heads, kv = c.n_heads // t, max(c.n_kv_heads // t, 1)
    block = b * (2 * s_r * D + s_i * (2 * D + 2 * heads * H + 2 * kv * H))
    return (c.n_layers * block + b * s_r * (2 * D + c.vocab_size)) * item


def _tape_peaks(c: TransformerConfig, table: list, p: int, v: int, t: int, micro: int) -> tuple[int, ...]:
    """Each device's peak bytes of tapes, kept from a chunk's F to its B: per block x, a, h, m (each one
    microbatch's (b, S, D)), q and y (N/t heads), k and v (the rank's kv heads); the head's x, n, logits.
    ZB-H1's W keeps, from B to W, each linear's input and output gradient: per block a, dq, dk, dv (q,
    k, v), y and do (wo), m, dz and 2 (gated: 3) (b, S, F/t) of the MLP; the head's n and dlogits; on
    the first stage the embedding's (b, S, D) gradient. B's peak holds the tape and these at once (a, m,
    y and the head's n are the same arrays)."""
    D, H, F = c.d_model, c.head_dim, c.d_ff // t
    heads, kv = c.n_heads // t, max(c.n_kv_heads // t, 1)
    per_d = micro // D  # b·S·itemsize
    block = per_d * (4 * D + 2 * heads * H + 2 * kv * H)
    head = per_d * (2 * D + c.vocab_size)
    w_block = per_d * (4 * D + 2 * heads * H + 2 * kv * H + (3 if c.activation in GATED else 2) * F)
    w_head, w_embed = per_d * (D + c.vocab_size), per_d * D
    shared_block, shared_head = per_d * (2 * D + heads * H), per_d * D
    per, last = c.n_layers // (p * v), p * v - 1
    zero_bubble = any(row[2] == "W" for row in table)
    held, peak = [0] * p, [0] * p
    for _, i, op, _, ch in sorted(table, key=lambda e: e[0]):
        vs = ch * p + i
        tape = per * block + (head if vs == last else 0)
        kept = shared = 0
        if zero_bubble:
            kept = per * w_block + (w_head if vs == last else 0) + (w_embed if vs == 0 else 0)
            shared = per * shared_block + (shared_head if vs == last else 0)
        if op == "F":
            held[i] += tape
        elif op == "B":
            peak[i] = max(peak[i], held[i] + kept - shared)
            held[i] += kept - tape
        else:
            held[i] -= kept
        peak[i] = max(peak[i], held[i])
    return tuple(peak)


def _tp_parts(name: str, c: TransformerConfig, n: int) -> int:
    """Into how many parts ``name`` is split over n tensor-parallel ranks (K/V when K < n: K, one head each)."""
    if name.endswith((".wk", ".wv")) and c.n_kv_heads % n:
        return c.n_kv_heads
    return n


def _walk_fsdp(
    c: TransformerConfig, size: dict[str, int], log: list, group: int, *, gather: bool, act: int = 0, t: int = 1
) -> None:
    """The unit-by-unit walk of zero2 (gradients reduce-scattered per unit), fsdp (gathers too) and
    fsdp_tp (on each rank's tp pieces ``size``, down columns of ``group``, with the blocks' tp
    all-reduces of ``act`` in rows of t and, when K < t, the shared K/V gradients' all-reduces)."""

    def ag(k: str) -> None:
        if gather:
            log.append(Collective("all_gather", k, size[k], group))

    def tp_all_reduces(layer: int, names: tuple[str, ...]) -> None:
        if t > 1:
            log.extend(Collective("all_reduce", f"layers.{layer}.{sub}", act, t) for sub in names)

    def done(names: list[str]) -> None:
        for k in names:
            if t > 1 and c.n_kv_heads % t and k.endswith((".wk", ".wv")):
                log.append(Collective("all_reduce", f"{k} grad", size[k], t // c.n_kv_heads))
            log.append(Collective("reduce_scatter", f"{k} grad", size[k], group))

    for k in ["embed"]:
        ag(k)
    for i in range(c.n_layers):
        for k in block_names(c, i):
            ag(k)
        tp_all_reduces(i, ("attention output", "mlp output"))
    for k in head_names(c):
        ag(k)
    for k in head_names(c):
        ag(k)
    done(["norm"] if c.tie_embeddings else ["norm", "lm_head"])
    for i in reversed(range(c.n_layers)):
        for k in block_names(c, i):
            ag(k)
        tp_all_reduces(i, ("mlp input grad", "attention input grad"))
        done(block_names(c, i))
    done(["embed"])  # the embedding's backward reads no weight: nothing to gather


def _walk_tp(c: TransformerConfig, size: dict, local: dict, act: int, t: int, d: int, sp: bool, log: list) -> None:
    """Megatron's f and g per sublayer (tp: all-reduces in a row of t; tp_sp: all-gathers and
    reduce-scatters), the replicated K/V gradients' grouped all-reduces, (tp_sp) the replicated
    weights' all-reduces, and (dp_tp) each gradient shard's all-reduce down a column of d."""

    def ar(tensor: str, v: int, group: int = t) -> None:
        log.append(Collective("all_reduce", tensor, v, group))

    def ag(tensor: str, v: int) -> None:
        log.append(Collective("all_gather", tensor, v, t))

    def rs(tensor: str, v: int) -> None:
        log.append(Collective("reduce_scatter", tensor, v, t))

    def enter(tensor: str) -> None:  # f: the identity, or sp's all-gather
        if sp:
            ag(tensor, act)

    def leave(tensor: str) -> None:  # g: an all-reduce, or sp's reduce-scatter
        (rs if sp else ar)(tensor, act)

    enter_grad, leave_grad = leave, enter  # their backwards swap them

    for i in range(c.n_layers):
        pre = f"layers.{i}."
        for sub in ("attention", "mlp"):
            enter(f"{pre}{sub} input")
            leave(f"{pre}{sub} output")

    def done(names: list[str]) -> None:
        for k in names:
            if c.n_kv_heads % t and k.endswith((".wk", ".wv")):
                ar(f"{k} grad", local[k], t // c.n_kv_heads)
            elif sp and tp_where(k, c, t, 0) is None:
                ar(f"{k} grad", size[k])
            if d > 1:
                ar(f"{k} grad shard", local[k], d)

    done(["norm"] if c.tie_embeddings else ["norm", "lm_head"])
    for i in reversed(range(c.n_layers)):
        pre = f"layers.{i}."
        for sub in ("mlp", "attention"):
            leave_grad(f"{pre}{sub} output grad")
            enter_grad(f"{pre}{sub} input grad")
        done(block_names(c, i))
    done(["embed"])


def _walk_cp(c: TransformerConfig, size: dict, batch: int, seq: int, n: int, item: int, log: list) -> None:
    """The ring's K/V blocks (n−1 steps forward; backward n−1 steps of K, V, dK, dV and one of dK, dV home)
    and dp's all-reduce of each unit's gradients when its backward ends."""
    kv = cp_ring_bytes(batch, seq, c.n_kv_heads, c.head_dim, n, item)

    def send(names: list[str], step: int) -> None:
        log.extend(Collective("send", f"ring {name} step {step}", kv, 2) for name in names)

    def done(names: list[str]) -> None:
        log.extend(Collective("all_reduce", f"{k} grad", size[k], n) for k in names)

    for _ in range(c.n_layers):
        for step in range(n - 1):
            send(["k", "v"], step)
    done(["norm"] if c.tie_embeddings else ["norm", "lm_head"])
    for i in reversed(range(c.n_layers)):
        for step in range(n - 1):
            send(["k", "v", "dk", "dv"], step)
        if n > 1:
            send(["dk", "dv"], n - 1)
        done(block_names(c, i))
    done(["embed"])


def _result(strategy: str, n: int, by_rank, kept: int, grads: int, state: int, tapes: int = 0) -> TransformerCost:
    bytes_by_rank = tuple(sum(x.bytes_per_device for x in log) for log in by_rank)
    busiest = max(range(n), key=bytes_by_rank.__getitem__)
    cost = TransformerCost(strategy, n, tuple(by_rank[busiest]), bytes_by_rank, kept, grads, state)
    return dataclasses.replace(cost, activation_bytes_per_rank=tapes)
