"""The transformer's training step on JAX (``be.parallel.transformer_step``): the spec's rank program
(`tensorglot.parallel.transformer_rank`) traced once inside `jax.shard_map` over a `Mesh`.

The same SPMD program NumPy's mesh runs on threads and torch on processes runs here as one jitted XLA
module: `ShardMapCollectives` is its `Collectives`, whose all-reduce, all-gather, reduce-scatter and ring
step are `psum`, `all_gather`, `psum_scatter` and `ppermute` over the mesh axes that make up each group.
The rank is `lax.axis_index`, a traced value: the spec's pieces (`Where`: part i of k) select by index
where i is traced, so each device reads its own shard of the (replicated) inputs.

A pipeline is not run here: each stage runs its own rows of the schedule, Python control flow that
depends on the rank, which one traced program cannot branch on; `parallel_pipeline` runs pp with the
schedule table turned into a `lax.switch` per slot instead.

The bytes are measured from the compiled module (`tensorglot.parallel.hlo.hlo_collectives`), the collectives listed in
the order the program issued them; the tests compare both with `transformer_cost`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tensorglot import parallel as spec
from tensorglot.parallel.devices import with_deadline
from tensorglot.parallel.hlo import hlo_collectives
from tensorglot.parallel.transformer_checks import PIPELINES

from . import parallel_pipeline

#: What one traced SPMD program expresses; the pipelines (pp, dp_pp, tp_pp, dp_tp_pp) are left out.
STRATEGIES = ("dp", "zero1", "zero2", "fsdp", "tp", "tp_sp", "cp", "dp_tp", "fsdp_tp")


def mesh_axes(step: spec.TransformerStep, n_kv_heads: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The mesh a step's groups are axes of: (d, t) with rank = d_index·t + t_index, and t split into
    (K, t/K) when K < t ranks share each kv head (their gradient is summed over the inner axis)."""
    n, t = step.world_size, step.tp
    if t > 1 and n_kv_heads % t:
        return (n // t, n_kv_heads, t // n_kv_heads), ("d", "k", "j")
    return (n // t, t), ("d", "t")


def group_axes(groups: spec.collectives.Groups, shape: tuple[int, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes whose groups are ``groups`` (None: every axis), or a ValueError."""
    if groups is None:
        return names
    want = {tuple(sorted(g)) for g in groups}
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    for size in range(1, len(names) + 1):
        for axes in itertools.combinations(range(len(names)), size):
            rest = [a for a in range(len(names)) if a not in axes]
            got = ids.transpose(*rest, *axes).reshape(-1, int(np.prod([shape[a] for a in axes])))
            if {tuple(g) for g in got.tolist()} == want:
                return tuple(names[a] for a in axes)
    raise ValueError(f"transformer_step: the groups {groups} are no axes of the mesh {dict(zip(names, shape))}")


class ShardMapCollectives(spec.Collectives):
    """One device's collectives inside `jax.shard_map`: its rank is `lax.axis_index` over the mesh."""

    def __init__(self, shape: tuple[int, ...], names: tuple[str, ...]) -> None:
        rank: Any = jax.lax.axis_index(names)  # traced: the spec's pieces and groups take it as data
        super().__init__(rank, int(np.prod(shape)))
        self.shape, self.names = shape, names

    def group_of(self, groups: spec.collectives.Groups, /) -> tuple[int, ...]:
        # Which group a traced rank is in is known only when it runs; the log needs only its size,
        # which every group of a mesh axis shares.
        if groups is None:
            return tuple(range(self.world_size))
        if len({len(g) for g in groups}) != 1:
            raise ValueError(f"transformer_step: the groups {groups} must all have one size on a mesh")
        return groups[0]

    def _axes(self, groups: spec.collectives.Groups) -> tuple[str, ...]:
        return group_axes(groups, self.shape, self.names)

    def _all_reduce(self, x: Any, groups: spec.collectives.Groups, /) -> Any:
        return jax.lax.psum(x, self._axes(groups))

    def _all_gather(self, shard: Any, groups: spec.collectives.Groups, /) -> Any:
        return jax.lax.all_gather(shard, self._axes(groups), axis=0, tiled=True)

    def _reduce_scatter(self, x: Any, groups: spec.collectives.Groups, /) -> Any:
        return jax.lax.psum_scatter(x, self._axes(groups), scatter_dimension=0, tiled=True)

    def _shift(self, x: Any, /) -> Any:
        n = self.world_size
        return jax.lax.ppermute(x, self.names, [(i, (i + 1) % n) for i in range(n)])

    def _send(self, x: Any, dst: int, tag: int, /) -> None:
        raise NotImplementedError("transformer_step: a send to a rank picked per rank is not traced on JAX")


def _native(a: Any) -> jax.Array:
    return a if isinstance(a, jax.Array) else jnp.asarray(a)


def _program(task: spec.Task, layers: Any):
    """(the jitted shard_map program, its mesh, what tracing it records): the program takes (params,
    tokens, targets, state) replicated and returns every rank's arrays among its pieces' leaves, stacked
    by rank; the record holds the pieces' tree, their static leaves (part counts, memory) and the log."""
    shape, names = mesh_axes(task.step, task.config.n_kv_heads)
    n = task.step.world_size
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names), devices=jax.devices()[:n])
    traced: dict[str, Any] = {}

    def body(params, tokens, targets, state):
        params = {k: params[k] for k in task.params}  # a pytree's dict comes back in sorted order
        local = dataclasses.replace(task, params=params, tokens=tokens, targets=targets, state=state)
        comm = ShardMapCollectives(shape, names)
        pieces = spec.transformer_rank(comm, layers, local, _native)
        leaves, tree = jax.tree_util.tree_flatten(
            (pieces.loss, pieces.grads, pieces.params, pieces.state, pieces.memory)
        )
        dynamic = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
        static = [None if i in dynamic else a for i, a in enumerate(leaves)]  # no tracer outlives its trace
        traced.update(tree=tree, leaves=static, dynamic=dynamic, log=list(comm.log))
        return tuple(jnp.asarray(leaves[i])[None] for i in dynamic)  # (1, ...): stacked by rank

    fn = jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(names), check_vma=False)
    return jax.jit(fn), mesh, traced


_COMPILED: dict[tuple[Any, ...], Any] = {}


def _compiled(task: spec.Task, layers: Any, args: tuple[Any, ...]):
    key = (task.step, task.config, task.tokens.shape)
    if key not in _COMPILED:
        fn, mesh, traced = _program(task, layers)
        placed = jax.device_put(args, NamedSharding(mesh, P()))
        # XLA's CSE would merge a backward's collective into the forward's on the same operand (fsdp's
        # all-gathers, the ring's K/V steps), keeping what they move alive in between, which is what
        # sending it again exists to avoid: compile without it, so the module sends what the program does.
        compiled = fn.lower(*placed).compile(compiler_options={"xla_disable_hlo_passes": "cse"})
        measured = hlo_collectives(compiled.as_text() or "", task.step.world_size)
        _COMPILED[key] = (compiled, mesh, traced, tuple(sum(c.bytes_per_device for c in d) for d in measured))
    return _COMPILED[key]


def _pieces(traced: dict[str, Any], outs: tuple[np.ndarray, ...], rank: int) -> spec.TransformerPieces:
    """Rank ``rank``'s `TransformerPieces` on the host: its row of every output, a traced part index as int."""
    leaves = list(traced["leaves"])
    for i, out in zip(traced["dynamic"], outs):
        a = out[rank]
        leaves[i] = int(a) if a.dtype.kind in "iu" else a
    loss, grads, params, state, memory = jax.tree_util.tree_unflatten(traced["tree"], leaves)
    return spec.TransformerPieces(float(loss), grads, params, state, memory)


def _run(task: spec.Task) -> spec.TransformerStepResult:
    import tensorglot

    s = task.step
    layers = tensorglot.get_backend("jax").layers
    dt = jnp.float64 if s.dtype == "float64" else jnp.float32
    params = {k: jnp.asarray(v, dt) for k, v in task.params.items()}
    state: dict[str, Any] | None = None
    if s.optimizer.state_arrays:  # AdamW's first step from zeros, its count traced: one program for every step
        zeros = {k: jnp.zeros_like(w) for k, w in params.items()}
        before = task.state or {"step": 0, "m": zeros, "v": zeros}
        state = {"step": jnp.asarray(before["step"])}
        state |= {x: {k: jnp.asarray(before[x][k], dt) for k in params} for x in "mv"}
    args = (params, jnp.asarray(task.tokens), jnp.asarray(task.targets), state)
    compiled, mesh, traced, bytes_by_rank = _compiled(task, layers, args)
    placed = jax.device_put(args, NamedSharding(mesh, P()))
    start = time.perf_counter()
    outs = jax.block_until_ready(compiled(*placed))
    seconds = time.perf_counter() - start
    host = tuple(np.asarray(o) for o in outs)
    ranks = [(_pieces(traced, host, r), traced["log"], seconds) for r in range(s.world_size)]
    result = spec.gather_transformer(task, ranks)
    return dataclasses.replace(result, bytes_by_rank=bytes_by_rank)  # what the compiled module sends


def _run_with_deadline(task: spec.Task) -> spec.TransformerStepResult:
    from .parallel import check_devices  # a cycle: that module exports transformer_step

    s = task.step
    run = _run
    if s.strategy in PIPELINES:
        if reason := parallel_pipeline.refusal(s):
            raise ValueError(reason)
        run = parallel_pipeline.run
    elif s.strategy not in STRATEGIES:
        raise ValueError(
            f"transformer_step: strategy {s.strategy!r} does not run on JAX (it runs {', '.join(STRATEGIES)}, "
            f"and {', '.join(parallel_pipeline.STRATEGIES)} with {', '.join(parallel_pipeline.SCHEDULES)})"
        )
    if s.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise TypeError(
            "transformer_step: float64 params need JAX's x64 mode (JAX would silently compute in float32); "
            "set JAX_ENABLE_X64=1 before starting Python"
        )
    check_devices("transformer_step", s.world_size)
    return with_deadline(f"transformer_step: {s.strategy} on {s.world_size} JAX devices", s.timeout, run, task)


transformer_step = spec.transformer_step_function(np.asarray, _run_with_deadline)
