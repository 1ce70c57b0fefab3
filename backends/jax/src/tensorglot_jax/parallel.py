"""JAX parallel strategies with a Mesh and `jax.shard_map`: see the spec (`tensorglot.parallel`).

Each strategy is one jitted SPMD program over a `Mesh` with Explicit axes (``d`` data, ``t`` tensor,
``s`` stage): `psum`, `all_gather`, `psum_scatter` and `ppermute` inside `jax.shard_map`. The bytes
are read from the compiled module: every all-reduce, all-gather, reduce-scatter and collective-permute
in ``jitted.lower(...).compile().as_text()``, with its shape and replica groups.

On CPU, n fake devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` set before JAX
initialises. On several hosts, call ``jax.distributed.initialize(coordinator_address, num_processes,
process_id)`` in each process first: ``jax.devices()`` then lists every host's devices, the same code
builds the mesh over all of them, and each process feeds its addressable shards.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tensorglot import parallel as spec
from tensorglot.parallel import Collective, StepResult

_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _forward_all(h, w_in, w_out):
    saved = []
    for l in range(w_in.shape[0]):
        h, s = spec.layer_forward(h, w_in[l], w_out[l])
        saved.append(s)
    return h, saved


# Per-device bodies. Params arrive stacked: w_in (L, D, F), w_out (L, F, D).


def _done(y, g, gi, go, w_in, w_out, lr):
    gi, go = jnp.stack(gi), jnp.stack(go)
    return y, g, gi, go, spec.sgd(w_in, gi, lr), spec.sgd(w_out, go, lr)


def _dp_body(w_in, w_out, x, dy, *, lr):
    L = w_in.shape[0]
    y, saved = _forward_all(x, w_in, w_out)
    gi, go, g = [None] * L, [None] * L, dy
    for l in reversed(range(L)):
        g, a, b = spec.layer_backward(saved[l], w_in[l], w_out[l], g)
        go[l] = jax.lax.psum(b, "d")
        gi[l] = jax.lax.psum(a, "d")
    return _done(y, g, gi, go, w_in, w_out, lr)


def _tp_body(w_in, w_out, x, dy, *, lr, dp: bool):
    # w_in (L, D, F/t) columns, w_out (L, F/t, D) rows of this device's tp index
    L = w_in.shape[0]
    h, saved = x, []
    for l in range(L):
        part, s = spec.layer_forward(h, w_in[l], w_out[l])
        saved.append(s)
        h = jax.lax.psum(part, "t")
    gi, go, g = [None] * L, [None] * L, dy
    for l in reversed(range(L)):
        part, gi[l], go[l] = spec.layer_backward(saved[l], w_in[l], w_out[l], g)
        g = jax.lax.psum(part, "t")
    if dp:
        for l in reversed(range(L)):
            go[l] = jax.lax.psum(go[l], "d")
            gi[l] = jax.lax.psum(gi[l], "d")
    return _done(h, g, gi, go, w_in, w_out, lr)


def _fsdp_body(w_in, w_out, x, dy, *, lr):
    # w_in (L, D/n, F), w_out (L, F/n, D): this device's rows of every parameter
    L = w_in.shape[0]

    def gather(shard):
        return jax.lax.all_gather(shard, "d", axis=0, tiled=True)

    h, saved = x, []
    for l in range(L):
        h, s = spec.layer_forward(h, gather(w_in[l]), gather(w_out[l]))
        saved.append(s)
    gi, go, g = [None] * L, [None] * L, dy
    for l in reversed(range(L)):
        # The barrier ties the shards to the backward's data, so XLA gathers them again here instead of
        # keeping the forward's full copies alive (ZeRO-3's point) or merging the two gathers.
        wi_s, wo_s, g = jax.lax.optimization_barrier((w_in[l], w_out[l], g))
        dpre, b = spec.out_backward(saved[l], gather(wo_s), g)
        go[l] = jax.lax.psum_scatter(b, "d", tiled=True)
        g, a = spec.in_backward(saved[l], gather(wi_s), dpre)
        gi[l] = jax.lax.psum_scatter(a, "d", tiled=True)
    return _done(h, g, gi, go, w_in, w_out, lr)


def _pp_body(w_in, w_out, x, dy, *, lr, p: int, m: int, schedule: str):
    # w_in (L/p, D, F), w_out (L/p, F, D): this stage's layers; x, dy (B, D) on every stage
    dt, per = x.dtype, w_in.shape[0]
    stage = jax.lax.axis_index("s")
    table = spec.pipeline_schedule(schedule, p, m)
    slots = spec.schedule_slots(table)
    kind = np.zeros((slots, p), np.int32)  # 0 idle, 1 forward, 2 backward
    micro = np.zeros((slots, p), np.int32)
    for t, i, op, j in table:
        kind[t, i], micro[t, i] = (1 if op == "F" else 2), j
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

    for t in range(slots):
        state, sent = jax.lax.switch(
            jnp.asarray(kind[t])[stage], [idle, forward, backward], state, jnp.asarray(micro[t])[stage]
        )
        for op_code, buffer, step_ in ((1, "act", 1), (2, "grad", -1)):
            pairs = [(src, src + step_) for src in range(p) if kind[t, src] == op_code and 0 <= src + step_ < p]
            if not pairs:
                continue
            got = jax.lax.ppermute(sent, "s", pairs)
            into = np.full(p, -1, np.int32)  # which microbatch each stage receives, -1 for none
            for src, dst in pairs:
                into[dst] = micro[t, src]
            recv = jnp.asarray(into)[stage]
            slot = jnp.maximum(recv, 0)
            state[buffer] = state[buffer].at[slot].set(jnp.where(recv >= 0, got, state[buffer][slot]))
    gi, go = state["gi"].astype(dt), state["go"].astype(dt)
    y, dx = state["out"].reshape(x.shape), state["dx"].reshape(x.shape)
    return y[None], dx[None], gi, go, spec.sgd(w_in, gi, lr), spec.sgd(w_out, go, lr)


# Building, compiling and measuring one strategy's program.


def _mesh(strategy: str, n: int, t: int) -> jax.sharding.Mesh:
    devices = jax.devices()[:n]
    if strategy == "dp_tp":
        return jax.make_mesh((n // t, t), ("d", "t"), axis_types=(AxisType.Explicit,) * 2, devices=devices)
    name = {"dp": "d", "fsdp": "d", "tp": "t", "pp": "s"}[strategy]
    return jax.make_mesh((n,), (name,), axis_types=(AxisType.Explicit,), devices=devices)


def _program(strategy: str, n: int, t: int, lr: float, m: int, schedule: str):
    """(body, in_specs, out_specs): params stacked (L, ...), then x, dy."""
    rep = P()
    if strategy == "dp":
        body, w, data = partial(_dp_body, lr=lr), (rep, rep), P("d")
        return body, (*w, data, data), (data, data, rep, rep, rep, rep)
    if strategy in ("tp", "dp_tp"):
        dp = strategy == "dp_tp"
        wi, wo, data = P(None, None, "t"), P(None, "t", None), P("d") if dp else rep
        return partial(_tp_body, lr=lr, dp=dp), (wi, wo, data, data), (data, data, wi, wo, wi, wo)
    if strategy == "fsdp":
        ws, data = P(None, "d"), P("d")
        return partial(_fsdp_body, lr=lr), (ws, ws, data, data), (data, data, ws, ws, ws, ws)
    st = P("s")
    body = partial(_pp_body, lr=lr, p=n, m=m, schedule=schedule)
    return body, (st, st, rep, rep), (st, st, st, st, st, st)


_COMPILED: dict[tuple[Any, ...], Any] = {}


def _compiled(strategy: str, n: int, t: int, lr: float, m: int, schedule: str, args: tuple[Any, ...]):
    key = (strategy, n, t, lr, m, schedule, *((a.shape, str(a.dtype)) for a in args))
    if key not in _COMPILED:
        mesh = _mesh(strategy, n, t)
        body, in_specs, out_specs = _program(strategy, n, t, lr, m, schedule)
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))
        shardings = tuple(NamedSharding(mesh, s) for s in in_specs)
        placed = tuple(jax.device_put(a, s) for a, s in zip(args, shardings))
        # XLA's CSE would merge fsdp's backward all-gathers into the forward's and keep the full
        # parameters alive between them, which is what ZeRO-3 exists to avoid: compile fsdp without it.
        options: dict[str, str | bool] | None = {"xla_disable_hlo_passes": "cse"} if strategy == "fsdp" else None
        compiled = fn.lower(*placed).compile(compiler_options=options)
        _COMPILED[key] = (compiled, shardings, hlo_collectives(compiled.as_text() or "", n))
    return _COMPILED[key]


_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute)(?:-start)?\("
    r"(?P<operands>[^)]*)\)(?P<attrs>.*)$"
)
_ARRAY = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_KIND = {
    "all-reduce": "all_reduce",
    "all-gather": "all_gather",
    "reduce-scatter": "reduce_scatter",
    "collective-permute": "send",
}


def _nbytes(text: str) -> int:
    return sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in _ARRAY.findall(text))


def _replica_groups(attrs: str, n: int) -> list[list[int]]:
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
        for group in _replica_groups(attrs, n):
            v = _nbytes(match["shape"]) * (len(group) if op == "reduce-scatter" else 1)
            for d in group:
                per_device[d].append(Collective(_KIND[op], name, v, len(group)))
    return per_device


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


_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorglot-jax-step")


def check_devices(fn: str, n: int) -> None:
    """A ValueError naming ``fn`` unless JAX has ``n`` devices."""
    have = len(jax.devices())
    if n > have:
        raise ValueError(
            f"{fn}: world_size = {n} is more than the {have} JAX devices; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX initialises"
        )


def with_deadline(what: str, n: int, timeout: float, run: Any, *args: Any) -> Any:
    """``run(*args)`` in the worker thread, or a TimeoutError naming ``what`` past ``timeout`` seconds."""
    # A compiled XLA computation cannot be interrupted: past the deadline the step raises, and the
    # computation finishes in its worker thread (a later step waits for it).
    future = _WORKER.submit(run, *args)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        raise TimeoutError(f"{what} on {n} JAX devices did not finish in {timeout:g} s") from None


def _run_with_deadline(c: spec.StepConfig, ps: dict[str, Any], x: Any, dy: Any) -> StepResult:
    check_devices("step", c.world_size)
    return with_deadline(f"parallel: {c.strategy}", c.world_size, c.timeout, _run, c, ps, x, dy)


def _run(c: spec.StepConfig, ps: dict[str, Any], x: Any, dy: Any) -> StepResult:
    """Compile (once per shape) and run the step's program; its collectives come from the compiled HLO."""
    L, n = len(ps) // 2, c.world_size
    w_in = jnp.stack([ps[f"layers.{l}.w_in"] for l in range(L)])  # (L, D, F)
    w_out = jnp.stack([ps[f"layers.{l}.w_out"] for l in range(L)])  # (L, F, D)
    args = (w_in, w_out, x, dy)
    compiled, shardings, per_device = _compiled(c.strategy, n, c.tp, c.lr, c.microbatches, c.schedule, args)
    placed = tuple(jax.device_put(a, s) for a, s in zip(args, shardings))
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*placed))
    seconds = time.perf_counter() - start
    y, dx, gi, go, ni, no = (_host(a) for a in out)
    if c.strategy == "pp":  # (n·B, D): every stage's buffer; the last stage's outputs, the first's input grads
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
