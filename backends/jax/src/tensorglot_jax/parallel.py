"""JAX parallel strategies with a Mesh and `jax.shard_map`: see the spec (`tensorglot.parallel`).

dp, tp, dp_tp and fsdp are the spec's `rank_step` traced once inside `jax.shard_map` over a (d, t) mesh
with Explicit axes, its collectives `psum`, `all_gather` and `psum_scatter` (`ShardMapCollectives`); pp
is a slot program over an axis ``s`` of stages (`slot_program`), its activations and gradients carried
by `ppermute`. The bytes are read from the compiled module (`tensorglot.parallel.hlo`).

On CPU, n fake devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` set before JAX
initialises. On several hosts, call ``jax.distributed.initialize(coordinator_address, num_processes,
process_id)`` in each process first: ``jax.devices()`` then lists every host's devices, the same code
builds the mesh over all of them, and each process feeds its addressable shards.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tensorglot import parallel as spec
from tensorglot.parallel import StepResult
from tensorglot.parallel.devices import with_deadline
from tensorglot.parallel.hlo import hlo_collectives
from tensorglot.parallel.schedules import slot_program

_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _spmd_body(c: spec.StepConfig, shape: tuple[int, int]):
    """dp, tp, dp_tp and fsdp: the spec's `rank_step`, traced once for every device of a (d, t) mesh (its
    rank a traced `lax.axis_index`), each device's pieces stacked by rank."""
    from .parallel_transformer import ShardMapCollectives  # a cycle: that module exports from this one

    def body(ps, x, dy):
        pieces = spec.rank_step(ShardMapCollectives(shape, ("d", "t")), ps, x, dy, c)
        return jax.tree_util.tree_map(
            lambda a: a[None], (pieces.output, pieces.input_grad, pieces.grads, pieces.params)
        )

    return body


def _pp_body(w_in, w_out, x, dy, *, lr, p: int, m: int, schedule: str):
    # w_in (L/p, D, F), w_out (L/p, F, D): this stage's layers; x, dy (B, D) on every stage
    from .parallel_pipeline import received  # a cycle: that module is imported at the end of this one

    dt, per = x.dtype, w_in.shape[0]
    stage = jax.lax.axis_index("s")
    codes, micro, branches, sends = slot_program(spec.pipeline_schedule(schedule, p, m), p)
    xs, dys = x.reshape(m, -1, x.shape[1]), dy.reshape(m, -1, dy.shape[1])  # (m, B/m, D)
    ct = jnp.promote_types(dt, jnp.float32)
    state = {
        "act": jnp.where(stage == 0, xs, jnp.zeros_like(xs)),  # inputs waiting for a forward
        "grad": jnp.where(stage == p - 1, dys, jnp.zeros_like(dys)),  # gradients waiting for a backward
        "x": jnp.zeros((per, *xs.shape), dt),
        "pre": jnp.zeros((per, m, xs.shape[1], w_in.shape[2]), ct),
        "out": jnp.zeros_like(xs),  # the last stage's outputs, the first stage's input gradients
        "dx": jnp.zeros_like(xs),
        "gi": jnp.zeros(w_in.shape, ct),
        "go": jnp.zeros(w_out.shape, ct),
    }

    def idle(st, j):
        return st, jnp.zeros_like(xs[0])

    def forward(st, j):
        st, h = dict(st), st["act"][j]
        for l in range(per):
            st["x"] = st["x"].at[l, j].set(h)
            h, (_, pre) = spec.layer_forward(h, w_in[l], w_out[l])
            st["pre"] = st["pre"].at[l, j].set(pre)
        st["out"] = st["out"].at[j].set(h)
        return st, h

    def backward(st, j):
        st, g = dict(st), st["grad"][j]
        for l in reversed(range(per)):
            g, a, b = spec.layer_backward((st["x"][l, j], st["pre"][l, j]), w_in[l], w_out[l], g)
            st["gi"] = st["gi"].at[l].add(a.astype(ct))
            st["go"] = st["go"].at[l].add(b.astype(ct))
        st["dx"] = st["dx"].at[j].set(g)
        return st, g

    fns = [{"idle": idle, "F": forward, "B": backward}[b] for b in branches]
    for t, slot in enumerate(sends):
        state, sent = jax.lax.switch(jnp.asarray(codes[t])[stage], fns, state, jnp.asarray(micro[t])[stage])
        for buffer, (pairs, into) in zip(("act", "grad"), slot):
            if pairs:
                got = jax.lax.ppermute(sent, "s", [(src, dst) for src, dst, _ in pairs])
                state[buffer] = received(state[buffer], got, jnp.asarray(into)[stage])
    gi, go = state["gi"].astype(dt), state["go"].astype(dt)
    y, dx = state["out"].reshape(x.shape), state["dx"].reshape(x.shape)
    return y[None], dx[None], gi, go, spec.sgd(w_in, gi, lr), spec.sgd(w_out, go, lr)


# Building, compiling and measuring one strategy's program.


def _pp_program(n: int, lr: float, m: int, schedule: str):
    """(the jitted pipeline over a mesh axis ``s`` of n stages, its input shardings): params stacked (L, ...)."""
    mesh = jax.make_mesh((n,), ("s",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])
    st, rep = P("s"), P()
    body = partial(_pp_body, lr=lr, p=n, m=m, schedule=schedule)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(st, st, rep, rep), out_specs=(st,) * 6, check_vma=False))
    return fn, tuple(NamedSharding(mesh, s) for s in (st, st, rep, rep))


_COMPILED: dict[tuple[Any, ...], Any] = {}


def _compiled(c: spec.StepConfig, args: tuple[Any, ...]):
    """The step's compiled program (once per strategy, sizes and shapes), its input shardings and each
    device's collectives read from the compiled module."""
    n = c.world_size
    key = (
        c.strategy,
        n,
        c.tp,
        c.lr,
        c.microbatches,
        c.schedule,
        str(jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), args)),
    )
    if key not in _COMPILED:
        if c.strategy == "pp":
            fn, shardings = _pp_program(n, c.lr, c.microbatches, c.schedule)
        else:
            shape = (n // c.tp, c.tp)
            mesh = jax.make_mesh(shape, ("d", "t"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:n])
            fn = jax.jit(
                jax.shard_map(_spmd_body(c, shape), mesh=mesh, in_specs=P(), out_specs=P(("d", "t")), check_vma=False)
            )
            shardings = (NamedSharding(mesh, P()),) * len(args)
        placed = tuple(jax.device_put(a, s) for a, s in zip(args, shardings))
        # XLA's CSE would merge fsdp's backward all-gathers into the forward's and keep the full
        # parameters alive between them, which is what ZeRO-3 exists to avoid: compile without it.
        compiled = fn.lower(*placed).compile(compiler_options={"xla_disable_hlo_passes": "cse"})
        _COMPILED[key] = (compiled, shardings, hlo_collectives(compiled.as_text() or "", n))
    return _COMPILED[key]


def _prepare(fn: str, params: Mapping[str, Any], x: Any, dy: Any):
    def arr(name: str, a: Any) -> Any:
        a = a if isinstance(a, jax.Array) else np.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} has dtype {a.dtype}, wanted a floating dtype")
        return a

    x = arr("x", x)
    dtype = str(x.dtype)
    if dtype not in _DTYPES:
        raise TypeError(f"{fn}: x has dtype {dtype}, wanted one of {', '.join(_DTYPES)}")
    dt = _DTYPES[dtype]
    ps = {k: jnp.asarray(arr(k, v), dt) for k, v in params.items()}
    x, dy = jnp.asarray(x, dt), jnp.asarray(arr("dy", dy), dt)
    return ps, x, dy, spec.mlp_shape(fn, ps, x, dy, dtype)


def _host(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == jnp.bfloat16 else a


def check_devices(fn: str, n: int) -> None:
    """A ValueError naming ``fn`` unless JAX has ``n`` devices."""
    have = len(jax.devices())
    if n > have:
        raise ValueError(
            f"{fn}: world_size = {n} is more than the {have} JAX devices; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX initialises"
        )


def _run_with_deadline(c: spec.StepConfig, ps: dict[str, Any], x: Any, dy: Any) -> StepResult:
    check_devices("step", c.world_size)
    return with_deadline(f"parallel: {c.strategy} on {c.world_size} JAX devices", c.timeout, _run, c, ps, x, dy)


def _run(c: spec.StepConfig, ps: dict[str, Any], x: Any, dy: Any) -> StepResult:
    """Compile (once per shape) and run the step's program; its collectives come from the compiled HLO."""
    L, n = len(ps) // 2, c.world_size
    if c.strategy == "pp":  # stacked (L, D, F) and (L, F, D): each stage holds its rows
        args: tuple[Any, ...] = tuple(jnp.stack([ps[f"layers.{l}.{k}"] for l in range(L)]) for k in ("w_in", "w_out"))
        args += (x, dy)
    else:
        args = (ps, x, dy)
    compiled, shardings, per_device = _compiled(c, args)
    placed = tuple(jax.device_put(a, s) for a, s in zip(args, shardings))
    start = time.perf_counter()
    out = jax.tree_util.tree_map(_host, jax.block_until_ready(compiled(*placed)))
    seconds = time.perf_counter() - start
    if c.strategy != "pp":
        y, dx, g, new = out
        pick = lambda d, r: {k: v[r] for k, v in d.items()}  # noqa: E731
        ranks = [spec.RankPieces(y[r], dx[r], pick(g, r), pick(new, r)) for r in range(n)]
        return spec.gather_result(c, ranks, per_device, seconds)
    y, dx, gi, go, ni, no = out  # (n·B, D): every stage's buffer; the last stage's outputs, the first's input grads
    y, dx = y.reshape(n, *x.shape)[-1], dx.reshape(n, *x.shape)[0]
    grads, new = {}, {}
    for l in range(L):
        grads[f"layers.{l}.w_in"], grads[f"layers.{l}.w_out"] = gi[l], go[l]
        new[f"layers.{l}.w_in"], new[f"layers.{l}.w_out"] = ni[l], no[l]
    param_bytes = 2 * placed[0].addressable_shards[0].data.nbytes  # w_in's shard and w_out's, the same size
    return spec.step_result(c, y, dx, grads, new, per_device, param_bytes, seconds)


_single = jax.jit(spec.one_device_step, static_argnames=("lr",))


def _one_device(ps: dict[str, Any], x: Any, dy: Any, *, lr: float) -> Any:
    return jax.block_until_ready(_single(ps, x, dy, lr=lr))


step, single_step = spec.parallel_functions(_prepare, _run_with_deadline, _one_device, _host)


def max_world_size() -> int | None:
    return len(jax.devices())


from .parallel_pipeline import STRATEGIES as _PIPELINES  # noqa: E402  (they use this module)
from .parallel_transformer import STRATEGIES as _SHARD_MAP  # noqa: E402

TRANSFORMER_STRATEGIES = _SHARD_MAP + _PIPELINES  # what the CLI runs for "all"
from .parallel_transformer import transformer_step as transformer_step  # noqa: E402
