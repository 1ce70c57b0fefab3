"""NumPy parallel strategies on a simulated mesh: see the spec (`tensorglot.parallel`).

The readable reference transport. A `Mesh` runs the spec's per-rank step on n threads in one process;
its collectives are NumPy operations on the arrays the ranks of a group leave in their slots, meeting
at barriers, and its sends are queues. The step itself, and what each collective logs, is the spec's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from tensorglot import parallel as spec
from tensorglot.parallel import Collective, Collectives, StepResult
from tensorglot.parallel.collectives import Groups
from tensorglot.parallel.step import check_timeout

from ._common import as_float

T = TypeVar("T")


class Mesh:
    """n simulated devices; `run` gives each a thread and its own `Collectives`."""

    def __init__(self, n: int, *, timeout: float = 120.0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Mesh: n must be a positive int, got {n!r}")
        check_timeout("Mesh", timeout)
        self.n, self.timeout = n, timeout
        self.slots: list[Any] = [None] * n  # what each rank brings to the current collective
        self.mail: dict[tuple[int, int, int], queue.Queue[np.ndarray]] = {}  # by (src, dst, tag): `mailbox`
        self.log: list[list[Collective]] = [[] for _ in range(n)]
        # A collective of all the ranks meets at this barrier; one of a group at that group's own
        # (`barrier_of`), so that a pipeline stage's group need not wait for the other stages.
        # A failing rank breaks them all for the others.
        self.barrier = threading.Barrier(n, timeout=timeout)
        self.barriers = {tuple(range(n)): self.barrier}
        self.lock = threading.Lock()

    def barrier_of(self, group: tuple[int, ...]) -> threading.Barrier:
        with self.lock:
            if group not in self.barriers:
                self.barriers[group] = threading.Barrier(len(group), timeout=self.timeout)
            return self.barriers[group]

    def mailbox(self, src: int, dst: int, tag: int) -> queue.Queue[np.ndarray]:
        with self.lock:
            return self.mail.setdefault((src, dst, tag), queue.Queue())

    def abort(self) -> None:
        with self.lock:
            for barrier in self.barriers.values():
                barrier.abort()

    def run(self, program: Callable[[Collectives], T], *, what: str = "Mesh.run") -> list[T]:
        """``program`` on every rank at once; the results in rank order. A failing rank stops them all."""
        results: list[Any] = [None] * self.n
        errors: list[BaseException] = []

        def rank(r: int) -> None:
            comm = _Rank(self, r)
            self.log[r] = comm.log
            try:
                results[r] = program(comm)
            except BaseException as exc:  # the first error is the cause; the others are broken barriers
                errors.append(exc)
                self.abort()

        threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(self.n)]
        deadline = time.monotonic() + self.timeout
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # Only broken barriers or an empty mailbox, and no other error: a rank waited past the timeout.
        waited = errors and all(isinstance(e, threading.BrokenBarrierError | queue.Empty) for e in errors)
        if any(t.is_alive() for t in threads) or waited:
            self.abort()
            raise TimeoutError(f"{what} on {self.n} simulated ranks did not finish in {self.timeout:g} s")
        if errors:
            raise errors[0]
        return results


class _Rank(Collectives):
    def __init__(self, mesh: Mesh, rank: int) -> None:
        super().__init__(rank, mesh.n)
        self.mesh = mesh

    def _exchange(self, x: np.ndarray, group: tuple[int, ...]) -> list[np.ndarray]:
        """The arrays every rank of ``group`` brings, in rank order."""
        barrier = self.mesh.barrier_of(group)
        self.mesh.slots[self.rank] = x
        barrier.wait()
        xs = [self.mesh.slots[r] for r in group]
        barrier.wait()  # everyone has read before anyone writes the next
        return xs

    def _all_reduce(self, x: np.ndarray, groups: Groups, /) -> np.ndarray:
        return np.sum(self._exchange(x, self.group_of(groups)), axis=0).astype(x.dtype)

    def _all_gather(self, shard: np.ndarray, groups: Groups, /) -> np.ndarray:
        return np.concatenate(self._exchange(shard, self.group_of(groups)))

    def _reduce_scatter(self, x: np.ndarray, groups: Groups, /) -> np.ndarray:
        group = self.group_of(groups)
        total = np.sum(self._exchange(x, group), axis=0).astype(x.dtype)
        return np.split(total, len(group))[group.index(self.rank)]

    def _send(self, x: np.ndarray, dst: int, tag: int, /) -> None:
        self.mesh.mailbox(self.rank, dst, tag).put(x.copy())

    def _recv(self, like: np.ndarray, src: int, tag: int, /) -> np.ndarray:
        return self.mesh.mailbox(src, self.rank, tag).get(timeout=self.mesh.timeout)


def _prepare(fn: str, params: Mapping[str, Any], x: Any, dy: Any):
    x = as_float(fn, "x", x)
    dy = as_float(fn, "dy", dy).astype(x.dtype)
    ps = {k: as_float(fn, k, v).astype(x.dtype) for k, v in params.items()}
    return ps, x, dy, spec.mlp_shape(fn, ps, x, dy, str(x.dtype))


def _run(c: spec.StepConfig, ps: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray) -> StepResult:
    mesh = Mesh(c.world_size, timeout=c.timeout)
    start = time.perf_counter()
    pieces = mesh.run(lambda comm: spec.rank_step(comm, ps, x, dy, c), what=f"parallel: {c.strategy}")
    return spec.gather_result(c, pieces, mesh.log, time.perf_counter() - start)


step, single_step = spec.parallel_functions(_prepare, _run, spec.one_device_step, np.asarray)


def max_world_size() -> int | None:
    return None


def _run_transformer(task: spec.Task) -> spec.TransformerStepResult:
    import tensorglot

    mesh = Mesh(task.step.world_size, timeout=task.step.timeout)
    layers = tensorglot.get_backend("numpy").layers
    start = time.perf_counter()
    pieces = mesh.run(
        lambda comm: spec.transformer_rank(comm, layers, task, np.asarray),
        what=f"transformer_step: {task.step.strategy}",
    )
    seconds = time.perf_counter() - start
    return spec.gather_transformer(task, [(p, log, seconds) for p, log in zip(pieces, mesh.log)])


transformer_step = spec.transformer_step_function(np.asarray, _run_transformer)
