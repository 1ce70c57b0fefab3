"""The transformer's pipeline (``pp``) on JAX: one SPMD program in `jax.shard_map` over a mesh axis
``s`` of stages that follows the spec's schedule table (`pipeline_table`: gpipe, 1f1b, zb_h1) as data.

A stage's rows of the table are Python control flow that depends on the rank, which one traced program
cannot branch on. So the table is turned, before tracing, into two (slots, stages) arrays: which op each
stage runs in each slot (idle, or F / B of the first, a middle or the last stage) and on which
microbatch. Every slot, each device `lax.switch`-es on its own entry and runs the spec's units
(`transformer_blocks`: embedding, blocks, head; forward, explicit backward, and ZB-H1's B leaving the
linears' inputs and output gradients in buffers for its W) on it; after it, one
`ppermute` over ``s`` per direction carries the activations forward and the gradients back between
the pairs of stages the table's row for that slot names. The slots run are the table's.

One traced program needs uniform shapes, so every stage's L/p blocks are stacked per parameter kind,
(p, L/p, ...) sharded on ``s``: device i holds only its blocks. The embedding and the head (final
norm, output projection) are inputs on every device, used only in the first and last stage's
branches; the bytes reported per rank are those of the names a stage holds (`device_names`), as
`transformer_cost` counts them, not the replicated inputs. The tapes a forward keeps for its backward
live in ring buffers of max(`activations_held`) microbatches (F and B take microbatches in order, so
the live ones are distinct modulo it); the activation bytes reported are the live tapes (and W's
buffers), counted from the traced arrays as the spec's pipeline counts them.

Not run: interleaved 1F1B (chunks per device), and dp or tp inside a stage (dp_pp, tp_pp, dp_tp_pp):
a stage's gradient bucket and its tp all-reduces would be collectives under the stage's switch, which
`hlo_collectives` (a count of the module's text) cannot attribute to the ranks that run them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tensorglot import parallel as spec
from tensorglot.parallel import transformer_blocks as units
from tensorglot.parallel.collectives import nbytes
from tensorglot.parallel.cost import Collective
from tensorglot.parallel.hlo import hlo_collectives
from tensorglot.parallel.schedules import activations_held, slot_program
from tensorglot.parallel.transformer_blocks import WHOLE, Model, block_names
from tensorglot.parallel.transformer_pipeline import tape_arrays, tape_bytes, unique_bytes
from tensorglot.parallel.transformer_shards import device_names, pipeline_table, take

STRATEGIES = ("pp",)
SCHEDULES = ("gpipe", "1f1b", "zb_h1")
EDGE = ("embed", "norm", "lm_head")  # the first and last stage's parameters


def refusal(step: spec.TransformerStep) -> str | None:
    """Why ``step`` does not run on JAX's pipeline (None: it does)."""
    if step.strategy not in STRATEGIES or step.schedule not in SCHEDULES:
        return (
            f"transformer_step: strategy {step.strategy!r} with schedule {step.schedule!r} does not run on JAX "
            f"(its pipeline runs {', '.join(STRATEGIES)} with {', '.join(SCHEDULES)}): interleaved chunks are not "
            "in its slot program, and dp or tp inside a stage would put collectives of a stage's own sizes under "
            "its switch, which the compiled module's count cannot attribute to the ranks that run them"
        )
    return None


def _kinds(config: Any) -> list[str]:
    return [k.split(".", 2)[2] for k in block_names(config, 0)]


def _check_uniform(config: Any, p: int) -> None:
    """The stages trace one block program on local layer indices: each layer's window and RoPE θ must
    be those of the same local layer on every stage."""
    per = config.n_layers // p
    thetas = config.rope_thetas or (config.rope_theta,) * config.n_layers
    for layer in range(config.n_layers):
        first = layer % per
        if config.window(layer) != config.window(first) or thetas[layer] != thetas[first]:
            raise ValueError(
                f"transformer_step: pp on JAX needs every stage's layers alike (one traced stage program), "
                f"got layer {layer} with window {config.window(layer)}, θ {thetas[layer]} against layer "
                f"{first}'s {config.window(first)}, {thetas[first]}"
            )


def received(buffer: Any, got: Any, j: Any) -> Any:
    """``buffer`` (by microbatch) with ``got`` at microbatch j, unchanged where j is −1 (nothing came)."""
    at = jnp.maximum(j, 0)
    return buffer.at[at].set(jnp.where(j >= 0, got, buffer[at]))


def _program(task: spec.Task, layers: Any):
    """(the jitted program, its mesh, the trace's record): the program takes (stacked blocks, edge
    params, tokens, targets, optimizer state) and returns each device's loss, gradients, updated
    parameters and state, stacked by stage."""
    s, c = task.step, task.config
    p, m = s.pp, s.microbatches
    per, kinds = c.n_layers // p, _kinds(c)
    _, table = pipeline_table(s.schedule, p, m, 1)
    code, micro, branches, sends = slot_program(table, p, branch=lambda row: (row[2], row[1] == 0, row[1] == p - 1))
    ring = max(activations_held([row[:4] for row in table], p))
    zero_bubble = any(row[2] == "W" for row in table)
    mesh = jax.make_mesh((p,), ("s",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:p])
    traced: dict[str, Any] = {}

    def body(blocks, edge, tokens, targets, state):
        stage = jax.lax.axis_index("s")
        model = Model(layers, c, s.dtype, jnp)
        w = dict(edge) | {f"layers.{l}.{k}": blocks[k][0, l] for l in range(per) for k in kinds}
        b, S = tokens.shape[0] // m, tokens.shape[1]
        zero = jnp.zeros((b, S, c.d_model), edge["embed"].dtype)
        # A probe of a stage's tapes (dead code to XLA): their structure, shapes and bytes.
        x, probe = zero, []
        for l in range(per):
            x, tape = units.block_forward(model, w, x, l)
            probe.append(tape)
        _, head_probe = units.head_forward(model, w, x, jnp.zeros((b, S), tokens.dtype))
        deferred_probe: tuple[list, list] = ([], [])  # ZB-H1's: what the blocks' B and the head's B leave for W
        if zero_bubble:
            dx = units.head_backward(model, w, head_probe, jnp.zeros((b, S), tokens.dtype), 1.0, {}, deferred_probe[1])
            for l in reversed(range(per)):
                dx = units.block_backward(model, w, dx, l, probe[l], {}, WHOLE, deferred_probe[0])
        probes = (probe, head_probe, *deferred_probe)
        trees = [jax.tree_util.tree_flatten(t) for t in probes]
        sizes: dict[tuple[str, bool, bool], tuple[int, ...]] = {}  # the bytes an op's tapes hold, from its trace

        def pack(tree: Any) -> list:
            return [a for a in jax.tree_util.tree_leaves(tree) if isinstance(a, jax.Array)]

        def unpack(k: int, arrays: list) -> Any:
            leaves, treedef = trees[k]
            it = iter(arrays)
            return jax.tree_util.tree_unflatten(treedef, [next(it) if isinstance(a, jax.Array) else a for a in leaves])

        st: dict[str, Any] = {
            "act": jnp.zeros((m, b, S, c.d_model), zero.dtype),  # activations received, by microbatch
            "grad": jnp.zeros((m, b, S, c.d_model), zero.dtype),  # their gradients received
            "tape": [jnp.zeros((ring, *a.shape), a.dtype) for a in pack(probe)],
            "head": [jnp.zeros((ring, *a.shape), a.dtype) for a in pack(head_probe)],
            "dfr": [[jnp.zeros((ring, *a.shape), a.dtype) for a in pack(d)] for d in deferred_probe],
            "dx": jnp.zeros((m, b, S, c.d_model), zero.dtype),  # ZB-H1: the first stage's B to its W
            "g": {k: jnp.zeros_like(blocks[k][0]) for k in kinds} | {k: jnp.zeros_like(a) for k, a in edge.items()},
            "loss": jnp.zeros((), zero.dtype),
        }

        def branch(op: str, first: bool, last: bool):
            def run(st: dict, j: Any) -> tuple[dict, Any]:
                st, slot = dict(st), j % ring
                tok, tgt = take(tokens, (0, j, m)), take(targets, (0, j, m))
                if op == "idle":
                    return st, zero
                if op == "W":
                    pending = [unpack(2 + k, [buf[slot] for buf in st["dfr"][k]]) for k in (0, 1)]
                    weights: dict[str, Any] = {}
                    units.weight_backward(model, pending[0] + pending[1], weights)
                    if first:  # the embedding's gradient from what B sent it
                        weights["embed"] = units.embed_backward(model, st["dx"][j], tok)
                    st["g"] = _accumulate(st["g"], weights)
                    return st, zero
                if op == "F":
                    x = units.embed_forward(model, w, tok) if first else st["act"][j]
                    saved = []
                    for l in range(per):
                        x, tape = units.block_forward(model, w, x, l)
                        saved.append(tape)
                    st["tape"] = [buf.at[slot].set(a) for buf, a in zip(st["tape"], pack(saved))]
                    sizes[op, first, last] = (tape_bytes(saved, None),)
                    if last:
                        value, head = units.head_forward(model, w, x, tgt)
                        sizes[op, first, last] = (tape_bytes(saved, head),)
                        st["head"] = [buf.at[slot].set(a) for buf, a in zip(st["head"], pack(head))]
                        st["loss"] = st["loss"] + value / m
                        return st, zero
                    return st, x
                saved = unpack(0, [buf[slot] for buf in st["tape"]])
                head_tape = unpack(1, [buf[slot] for buf in st["head"]]) if last else None
                grads: dict[str, Any] = {}
                deferred: tuple[Any, Any] = ([], []) if zero_bubble else (None, None)
                if head_tape is not None:  # the last stage: the loss's gradient starts here
                    dx = units.head_backward(model, w, head_tape, tgt, 1.0 / m, grads, deferred[1])
                else:
                    dx = st["grad"][j]
                for l in reversed(range(per)):
                    dx = units.block_backward(model, w, dx, l, saved[l], grads, WHOLE, deferred[0])
                arrays = tape_arrays(saved, head_tape)
                if zero_bubble:
                    for k in (0, 1) if last else (0,):  # the head's only on the last stage
                        st["dfr"][k] = [buf.at[slot].set(a) for buf, a in zip(st["dfr"][k], pack(deferred[k]))]
                    kept = [a for _, x, dy, _ in deferred[0] + deferred[1] for a in (x, dy)] + ([dx] if first else [])
                    sizes[op, first, last] = (unique_bytes(arrays), unique_bytes(kept), unique_bytes(arrays + kept))
                    if first:
                        st["dx"] = st["dx"].at[j].set(dx)
                elif first:
                    grads["embed"] = units.embed_backward(model, dx, tok)
                st["g"] = _accumulate(st["g"], grads)
                return st, zero if first else dx

            return run

        fns = [branch(*(("idle", False, False) if kind == "idle" else kind)) for kind in branches]
        logs: list[list[Collective]] = [[] for _ in range(p)]
        for t, slot in enumerate(sends):  # the table's slots
            st, sent = jax.lax.switch(jnp.asarray(code[t])[stage], fns, st, jnp.asarray(micro[t])[stage])
            for (buffer, what), (pairs, into) in zip((("act", "activation"), ("grad", "grad")), slot):
                if pairs:
                    got = jax.lax.ppermute(sent, "s", [(src, dst) for src, dst, _ in pairs])
                    for src, _, j in pairs:
                        logs[src].append(Collective("send", f"microbatch {j} {what}", nbytes(sent), 2))
                    st[buffer] = received(st[buffer], got, jnp.asarray(into)[stage])
        ran = [row[:4] for row in sorted(table, key=lambda row: row[0])]  # in the order the slots ran them
        held = [0] * p  # each stage's live tapes, from its F to its B (ZB-H1: and W's buffers, to its W)
        peaks = [0] * p
        for _, i, op, _ in ran:
            first, last = i == 0, i == p - 1
            if op == "F":
                held[i] += sizes["F", first, last][0]
            elif op == "W":
                held[i] -= sizes["B", first, last][1]
            elif zero_bubble:  # B's peak holds the tape and W's new buffers at once
                freed, kept, both = sizes["B", first, last]
                peaks[i] = max(peaks[i], held[i] - freed + both)
                held[i] += kept - freed
            else:
                held[i] -= sizes["F", first, last][0]
            peaks[i] = max(peaks[i], held[i])
        traced.update(logs=logs, ran=ran, activations=peaks)
        local = {k: blocks[k][0] for k in kinds} | dict(edge)
        step = state["step"] if state is not None else 0
        new: dict[str, Any] = {}
        mv: dict[str, dict[str, Any]] = {"m": {}, "v": {}}
        for k, a in local.items():
            mk = vk = None
            if state is not None:
                mk, vk = (
                    state["m"][k][0] if k in kinds else state["m"][k],
                    state["v"][k][0] if k in kinds else state["v"][k],
                )
            new[k], mv["m"][k], mv["v"][k] = s.optimizer.update(a, st["g"][k], mk, vk, step)
        out = (st["loss"], st["g"], new) + ((mv["m"], mv["v"]) if state is not None else ())
        return jax.tree_util.tree_map(lambda a: a[None], out)  # (1, ...): stacked by stage

    state_spec = {"step": P(), "m": {k: P("s") if k in kinds else P() for k in (*kinds, *EDGE)}}
    state_spec["v"] = state_spec["m"]
    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(P("s"), P(), P(), P(), state_spec if s.optimizer.state_arrays else P()),
        out_specs=P("s"), check_vma=False,
    )  # fmt: skip
    return jax.jit(fn), mesh, traced, state_spec


_COMPILED: dict[tuple[Any, ...], Any] = {}


def _place(mesh: Any, args: tuple, state_spec: dict) -> tuple:
    blocks, edge, tokens, targets, state = args
    put = lambda a, spec_: jax.device_put(a, NamedSharding(mesh, spec_))  # noqa: E731
    placed_state = None
    if state is not None:
        placed_state = {"step": put(state["step"], P())}
        placed_state |= {x: {k: put(a, state_spec[x][k]) for k, a in state[x].items()} for x in "mv"}
    rep = [put(a, P()) for a in (tokens, targets)]
    return (
        {k: put(a, P("s")) for k, a in blocks.items()},
        {k: put(a, P()) for k, a in edge.items()},
        *rep,
        placed_state,
    )


def _accumulate(sums: dict, grads: dict) -> dict:
    """``sums`` plus an op's ``grads``: a block's (local name) into its kind's stacked row."""
    sums = dict(sums)
    for name, a in grads.items():
        if name.startswith("layers."):
            _, l, k = name.split(".", 2)
            sums[k] = sums[k].at[int(l)].add(a)
        else:
            sums[name] = sums[name] + a
    return sums


def _pieces(tree: dict, stage: int, per: int, kinds: list[str], names: list[str]) -> dict:
    """Stage ``stage``'s arrays of a stacked output under the spec's names: its blocks and edge names."""
    got = {f"layers.{stage * per + l}.{k}": tree[k][stage][l] for k in kinds for l in range(per)}
    got |= {k: tree[k][stage] for k in EDGE}
    return {k: (got[k], None) for k in names}


def run(task: spec.Task) -> spec.TransformerStepResult:
    """``task`` (a checked pp step) on p JAX devices, gathered into a `TransformerStepResult`."""
    import tensorglot

    s, c = task.step, task.config
    p, per, kinds = s.pp, c.n_layers // s.pp, _kinds(c)
    _check_uniform(c, p)
    dt = jnp.float64 if s.dtype == "float64" else jnp.float32

    def stack(d: dict) -> tuple[dict, dict]:  # (p, L/p, ...) per block kind, and the edge arrays
        blocks = {k: jnp.asarray(np.stack([d[f"layers.{L}.{k}"] for L in range(c.n_layers)]), dt) for k in kinds}
        blocks = {k: a.reshape(p, per, *a.shape[1:]) for k, a in blocks.items()}
        return blocks, {k: jnp.asarray(d[k], dt) for k in EDGE}

    blocks, edge = stack(task.params)
    state: dict[str, Any] | None = None
    if s.optimizer.state_arrays:  # AdamW's first step from zeros, its count traced: one program for every step
        zeros = {k: np.zeros_like(a) for k, a in task.params.items()}
        before = task.state or {"step": 0, "m": zeros, "v": zeros}
        state = {"step": jnp.asarray(before["step"])}
        for x in "mv":
            sb, se = stack(before[x])
            state[x] = sb | se
    args = (blocks, edge, jnp.asarray(task.tokens), jnp.asarray(task.targets), state)
    key = (s, c, task.tokens.shape)
    if key not in _COMPILED:
        fn, mesh, traced, state_spec = _program(task, tensorglot.get_backend("jax").layers)
        compiled = fn.lower(*_place(mesh, args, state_spec)).compile(compiler_options={"xla_disable_hlo_passes": "cse"})
        measured = hlo_collectives(compiled.as_text() or "", p)
        _COMPILED[key] = (
            compiled,
            mesh,
            traced,
            state_spec,
            tuple(sum(x.bytes_per_device for x in d) for d in measured),
        )
    compiled, mesh, traced, state_spec, bytes_by_rank = _COMPILED[key]
    placed = _place(mesh, args, state_spec)
    start = time.perf_counter()
    outs = jax.tree_util.tree_map(np.asarray, jax.block_until_ready(compiled(*placed)))
    seconds = time.perf_counter() - start
    ranks = []
    for i in range(p):
        names = device_names(c, i, p, 1)

        held = sum(nbytes(task.params[k]) for k in names)
        memory = {"params": held, "grads": held, "optimizer_state": s.optimizer.state_arrays * held}
        memory["activations"] = traced["activations"][i]
        st = {x: _pieces(outs[3 + n], i, per, kinds, names) for n, x in enumerate("mv")} if state is not None else {}
        rows = [row for row in traced["ran"] if row[1] == i]
        piece = spec.TransformerPieces(
            float(outs[0][i]),
            _pieces(outs[1], i, per, kinds, names),
            _pieces(outs[2], i, per, kinds, names),
            st,
            memory,
            rows,
        )
        ranks.append((piece, traced["logs"][i], seconds))
    result = spec.gather_transformer(task, ranks)
    return dataclasses.replace(result, bytes_by_rank=bytes_by_rank)  # what the compiled module sends
