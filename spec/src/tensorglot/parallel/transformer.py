"""One training step of the spec's transformer split over n devices: its strategies, the checks before
it runs, what every rank is told (`Task`), what it returns (`TransformerStepResult`), and
`transformer_step_function`, which builds a backend's ``parallel.transformer_step`` from its transport.

The loss is `tensorglot.layers.Layers.value_and_grad`'s: the mean token cross-entropy over ``targets``.
Every rank computes the mean over the tokens it holds; its piece weighs what share of the step's tokens
those are, so the pieces' gradients add up to the whole step's with no rescaling after a collective.

Strategies (`TRANSFORMER_STRATEGIES`; the per-rank programs are in `transformer_rank`):
  * ``dp``: the batch split n ways, every gradient all-reduced; every rank updates everything.
  * ``zero1``, ``zero2`` (arXiv:1910.02054): dp, each rank updating (and keeping the optimizer state
    of) 1/n of every parameter, then all-gathering it; zero1 reduce-scatters the gradients after the
    whole backward, zero2 after each unit's backward (so only 1/n of them outlives the unit).
  * ``fsdp`` (ZeRO-3): also the parameters in 1/n shards, each unit (the embedding, a block, the head)
    all-gathered before its forward and again before its backward; gradients reduce-scattered.
  * ``tp`` (Megatron, arXiv:1909.08053): heads split n ways (K/V heads too, or replicated on the n/K
    ranks that read one when K < n), the MLP's first weights by columns and its last by rows; one
    all-reduce after each sublayer forward and one of its input gradient backward. ``tp_sp`` adds
    sequence parallel (arXiv:2205.05198): norms and residual stream on S/n positions, the all-reduces
    become all-gather and reduce-scatter, and the norms', embedding's and head's gradients all-reduced.
  * ``cp``: context parallel, ring attention over a head and a tail chunk of the sequence per rank
    (`transformer_ring`); the K/V blocks are sends around the ring, the gradients all-reduced as in dp.
  * ``pp``: the blocks in n stages (the embedding on the first, the head on the last), the batch in m
    microbatches, run by `pipeline_schedule` (gpipe, 1f1b, zb_h1: the backward split into B and W) or
    `interleaved_schedule` (``chunks`` virtual stages per device) (`transformer_pipeline`); activations
    and gradients are sends, tagged by stage and microbatch.
  * ``fsdp_tp`` (`transformer_fsdp_tp`): tp in rows of t, each tp piece split flat fsdp-style down
    the columns of d (gathered per unit, gradients reduce-scattered).
  * ``dp_tp``, ``dp_pp``, ``tp_pp``, ``dp_tp_pp``: a (d, pp, tp) mesh, rank = dp·(pp·tp) + stage·tp +
    tp_index: each pipeline stage a tp group, each replica on B/d samples, and each rank's gradients
    all-reduced down its column of d replicas.

Parameters are split flat (zero, fsdp: the i-th 1/n of the flattened array) or on a named axis (tp), so
a rank's piece is placed back into the whole by `Where`; gathering happens outside the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..params import TransformerConfig, check_params, param_shapes
from .cost import Collective
from .transformer_checks import PIPELINE_SCHEDULES as PIPELINE_SCHEDULES
from .transformer_checks import TRANSFORMER_STRATEGIES as TRANSFORMER_STRATEGIES
from .transformer_checks import check_chunks, check_transformer_step
from .transformer_optim import Optimizer, check_optimizer

#: A piece's place in its whole: None (all of it), ("flat", i, k) or (axis, i, k): part i of k equal parts
#: of the flattened array or on an axis, or ("in", outer, inner): the inner piece of the outer piece
#: (fsdp_tp: a flat shard of a tp piece).
Where = tuple[Any, Any, Any] | None


@dataclass(frozen=True)
class TransformerStep:
    """A checked step's options: what every rank is told besides the arrays."""

    strategy: str
    world_size: int
    microbatches: int
    schedule: str
    optimizer: Optimizer
    timeout: float
    dtype: str
    chunks: int = 1  # interleaved: the chunks (virtual stages) per pipeline device
    tp: int = 1  # the mesh: rank = dp_index·(pp·tp) + stage·tp + tp_index; the dp size is n / (pp·tp)
    pp: int = 1


@dataclass(frozen=True)
class Task:
    """Everything a rank needs, as host NumPy arrays: sent once to every rank."""

    step: TransformerStep
    config: TransformerConfig
    params: dict[str, np.ndarray]
    tokens: np.ndarray  # (B, S) int64
    targets: np.ndarray  # (B, S) int64
    state: dict[str, Any] | None  # AdamW: {"step": t, "m": {name: array}, "v": {name: array}}


@dataclass
class TransformerPieces:
    """One rank's part of a step: its share of the loss, its pieces (array, `Where`) of the gradients,
    updated parameters and optimizer state, the bytes it keeps, and the pipeline slots it ran."""

    loss: Any  # a float, or a 0-d array where the step is traced (JAX)
    grads: dict[str, tuple[Any, Where]]
    params: dict[str, tuple[Any, Where]]
    state: dict[str, dict[str, tuple[Any, Where]]]  # "m", "v"
    memory: dict[str, int]  # "params", "grads", "optimizer_state"
    schedule: list[tuple[Any, ...]] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Any]) -> TransformerPieces:
        """The same pieces with ``fn`` applied to every array (to the host, say)."""

        def each(d: dict[str, tuple[Any, Where]]) -> dict[str, tuple[Any, Where]]:
            return {k: (fn(a), w) for k, (a, w) in d.items()}

        state = {k: each(v) for k, v in self.state.items()}
        loss = self.loss if isinstance(self.loss, float) else fn(self.loss)  # an array: a traced step's
        return TransformerPieces(loss, each(self.grads), each(self.params), state, self.memory, self.schedule)


class Traffic:
    """What a measured step and the model both report: the busiest rank's ``collectives`` and every
    rank's bytes sent, ``bytes_by_rank``."""

    collectives: tuple[Collective, ...]
    bytes_by_rank: tuple[int, ...]

    @property
    def bytes_per_device(self) -> int:
        return max(self.bytes_by_rank)

    @property
    def bytes_by_kind(self) -> dict[str, int]:
        """The busiest rank's bytes sent, by kind of collective."""
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0) + c.bytes_per_device
        return out


@dataclass
class TransformerStepResult(Traffic):
    """What one training step of the transformer returns, on the host, pieces placed into whole arrays.

    ``collectives`` are the busiest rank's, in issue order (kind, the full tensor's bytes V, group size);
    ``bytes_by_rank`` is what each rank sent; the memory figures are the largest over the ranks.
    """

    strategy: str
    world_size: int
    loss: float
    grads: dict[str, np.ndarray]  # by the spec's parameter names
    params: dict[str, np.ndarray]  # after the update
    state: dict[str, Any] | None  # AdamW's, whole: {"step", "m", "v"}
    collectives: tuple[Collective, ...]
    bytes_by_rank: tuple[int, ...]
    param_bytes_per_rank: int
    grad_bytes_per_rank: int
    optimizer_bytes_per_rank: int
    schedule: tuple[tuple[Any, ...], ...] = ()  # pp: the rows of the table the stages ran
    seconds: float = 0.0
    activation_bytes_by_stage: tuple[int, ...] = ()  # pp: the peak bytes of tapes each device kept
    activation_bytes_per_rank: int = 0  # the peak bytes of tapes (ZB-H1: and W's buffers) a rank kept


def place(shapes: Mapping[str, tuple[int, ...]], pieces: Sequence[dict[str, tuple[Any, Where]]]) -> dict:
    """Whole arrays from every rank's pieces (a replicated piece is written by each of its ranks)."""
    out: dict[str, np.ndarray] = {}
    for ranks in pieces:
        for name, (a, where) in ranks.items():
            a = np.asarray(a)
            _put(out.setdefault(name, np.zeros(shapes[name], a.dtype)), where, a)
    return {k: out[k] for k in shapes if k in out}  # in the parameters' order


def _put(whole: np.ndarray, where: Where, a: np.ndarray) -> None:
    """Write ``a`` at ``where`` in ``whole`` (a contiguous array)."""
    if where is None:
        whole[...] = a
    elif where[0] == "in":  # a piece of a piece: write into a copy of the outer piece, then put it back
        index = _index(whole.shape, where[1])
        outer = np.ascontiguousarray(whole[index])
        _put(outer, where[2], a)
        whole[index] = outer
    elif where[0] == "flat":
        whole.reshape(-1)[_index((whole.size,), (0, *where[1:]))] = a
    else:
        whole[_index(whole.shape, where)] = a


def _index(shape: tuple[int, ...], where: Any) -> tuple[slice, ...]:
    """The slices of part i of k on ``where``'s axis."""
    axis, i, k = where
    size = shape[axis] // k
    index = [slice(None)] * len(shape)
    index[axis] = slice(i * size, (i + 1) * size)
    return tuple(index)


def gather_transformer(task: Task, outputs: Sequence[tuple[TransformerPieces, Sequence[Collective], float]]) -> Any:
    """The ranks' (pieces on the host, log, seconds), in rank order, joined into a `TransformerStepResult`."""
    pieces, logs, seconds = zip(*outputs)
    shapes = param_shapes(task.config)
    state = None
    if task.step.optimizer.state_arrays:
        before = 0 if task.state is None else int(task.state["step"])
        state = {"step": before + 1, **{k: place(shapes, [p.state[k] for p in pieces]) for k in ("m", "v")}}
    by_rank = tuple(sum(c.bytes_per_device for c in log) for log in logs)
    busiest = max(range(len(logs)), key=by_rank.__getitem__)
    memory = {k: max(p.memory[k] for p in pieces) for k in ("params", "grads", "optimizer_state")}
    return TransformerStepResult(
        task.step.strategy,
        task.step.world_size,
        float(sum(float(p.loss) for p in pieces)),
        place(shapes, [p.grads for p in pieces]),
        place(shapes, [p.params for p in pieces]),
        state,
        tuple(logs[busiest]),
        by_rank,
        memory["params"],
        memory["grads"],
        memory["optimizer_state"],
        tuple(sorted(e for p in pieces for e in p.schedule)),
        max(seconds),
        tuple(pieces[i * task.step.tp].memory["activations"] for i in range(task.step.pp))
        if task.step.strategy in ("pp", "dp_pp", "tp_pp", "dp_tp_pp")
        else (),
        max(p.memory.get("activations", 0) for p in pieces),
    )


def transformer_step_function(
    to_numpy: Callable[[Any], np.ndarray], run: Callable[[Task], TransformerStepResult]
) -> Callable[..., TransformerStepResult]:
    """A backend's ``parallel.transformer_step`` from ``to_numpy`` (its arrays to the host) and ``run``,
    which runs a checked `Task` on ``task.step.world_size`` ranks and gathers it (`gather_transformer`)."""

    def transformer_step(
        params: Mapping[str, Any],
        config: TransformerConfig,
        tokens: Any,
        targets: Any,
        /,
        *,
        strategy: str,
        world_size: int,
        microbatches: int | None = None,
        schedule: str = "1f1b",
        chunks: int | None = None,
        tp_size: int | None = None,
        pp_size: int | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
    ) -> TransformerStepResult:
        """One training step of the transformer under ``strategy`` on ``world_size`` devices.

        Args:
          params, config: the model (`tensorglot.init_params`); the step's dtype is the params' one.
          tokens, targets: (B, S) ints; the loss is their mean cross-entropy (`Layers.value_and_grad`).
          strategy: one of ``TRANSFORMER_STRATEGIES``; microbatches (default: the pp size) and schedule
            are the pipelines'; tp_size and pp_size shape the meshes (`check_transformer_step`).
          optimizer: ``sgd`` (``w − lr·g``) or ``adamw`` (lr, betas, eps, weight_decay as torch's);
            ``state`` is the previous step's ``result.state`` (None: fresh).
          timeout: seconds the step may take; past it the backend raises TimeoutError.

        Everything is checked (`check_transformer_step`) before any rank starts.
        """
        fn = "transformer_step"

        def to_host(a: Any) -> np.ndarray:
            return a if isinstance(a, np.ndarray) else np.asarray(to_numpy(a))

        if not isinstance(config, TransformerConfig):
            raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
        host = {k: to_host(v) for k, v in params.items()}
        check_params(fn, {k: v.shape for k, v in host.items()}, config)
        dtypes = {str(v.dtype) for v in host.values()}
        if len(dtypes) != 1 or not dtypes <= {"float64", "float32"}:
            raise TypeError(f"{fn}: params must share one dtype, float64 or float32, got {sorted(dtypes)}")
        tok, tgt = (to_host(t) for t in (tokens, targets))
        if tok.ndim != 2 or tok.shape != tgt.shape or tok.dtype.kind not in "iu" or tgt.dtype.kind not in "iu":
            raise ValueError(f"{fn}: tokens and targets must be (B, S) ints of one shape, got {tok.shape}, {tgt.shape}")
        for name, t in (("tokens", tok), ("targets", tgt)):
            if t.size and (t.min() < 0 or t.max() >= config.vocab_size):
                raise ValueError(f"{fn}: {name} must lie in [0, vocab_size) = [0, {config.vocab_size})")
        batch, seq = tok.shape
        m, tp, pp = check_transformer_step(
            config, batch, seq, strategy, world_size, microbatches=microbatches, schedule=schedule,
            tp_size=tp_size, pp_size=pp_size,
        )  # fmt: skip
        opt = check_optimizer(fn, optimizer, lr, betas, eps, weight_decay)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"{fn}: timeout must be a positive number of seconds, got {timeout!r}")
        v = check_chunks(config, schedule, pp, m, chunks) if pp > 1 or strategy == "pp" else 1
        step = TransformerStep(strategy, world_size, m, schedule, opt, float(timeout), dtypes.pop(), v, tp, pp)
        st = None
        if opt.state_arrays and state is not None:
            st = {"step": int(state["step"]), **{k: {n: to_host(a) for n, a in state[k].items()} for k in "mv"}}
        return run(Task(step, config, host, tok.astype(np.int64), tgt.astype(np.int64), st))

    return transformer_step
