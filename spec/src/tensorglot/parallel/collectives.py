"""The collectives a rank's step calls: the interface between the spec's step and a backend's transport.

`Collectives` is one rank's view of n ranks. Its public methods log each collective the way the cost
model counts it (kind, the full tensor's bytes V in the step's dtype, group size), then hand the tensor
to the transport, which a backend writes: NumPy's simulated mesh (threads meeting at barriers), torch's
process group (gloo, NCCL). A subclass implements ``_all_reduce``, ``_all_gather``, ``_reduce_scatter``,
``_send`` and ``_recv`` (and ``_shift``, a ring step, where a send and a receive are not enough).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from .cost import Collective

#: The ranks split into groups, each rank in exactly one; None is one group of every rank.
Groups = tuple[tuple[int, ...], ...] | None


def nbytes(x: Any, /) -> int:
    """The bytes of an array of any array-API namespace."""
    return math.prod(x.shape) * array_namespace(x).finfo(x.dtype).bits // 8


def _partition(groups: Sequence[Sequence[int]] | None) -> Groups:
    """``groups`` as tuples; one group (or None) is None, the whole world."""
    return None if groups is None or len(groups) == 1 else tuple(tuple(g) for g in groups)


class Collectives:
    """One rank's collectives over ``world_size`` ranks; ``log`` holds what it took part in, in order."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.log: list[Collective] = []

    def group_of(self, groups: Groups, /) -> tuple[int, ...]:
        """This rank's group in ``groups``."""
        if groups is None:
            return tuple(range(self.world_size))
        return next(g for g in groups if self.rank in g)

    def all_reduce(self, x: Any, /, *, tensor: str, groups: Sequence[Sequence[int]] | None = None) -> Any:
        """The sum of ``x`` over this rank's group; ``groups`` partitions the ranks (None: one group of all)."""
        parts = _partition(groups)
        self.log.append(Collective("all_reduce", tensor, nbytes(x), len(self.group_of(parts))))
        return self._all_reduce(x, parts)

    def all_gather(self, shard: Any, /, *, tensor: str, groups: Sequence[Sequence[int]] | None = None) -> Any:
        """Every ``shard`` of this rank's group concatenated on axis 0, in rank order; V is the gathered tensor."""
        parts = _partition(groups)
        size = len(self.group_of(parts))
        self.log.append(Collective("all_gather", tensor, nbytes(shard) * size, size))
        return self._all_gather(shard, parts)

    def reduce_scatter(self, x: Any, /, *, tensor: str, groups: Sequence[Sequence[int]] | None = None) -> Any:
        """This rank's 1/g (on axis 0, by its place in its group of g) of the sum of its group's ``x``; V is ``x``."""
        parts = _partition(groups)
        self.log.append(Collective("reduce_scatter", tensor, nbytes(x), len(self.group_of(parts))))
        return self._reduce_scatter(x, parts)

    def send(self, x: Any, /, *, dst: int, tensor: str, tag: int = 0) -> None:
        """Send ``x`` to rank ``dst`` without waiting for it to be received; ``tag`` keeps apart messages
        that the two ranks would otherwise receive in a different order than they were sent."""
        self.log.append(Collective("send", tensor, nbytes(x), 2))
        self._send(x, dst, tag)

    def shift(self, x: Any, /, *, tensor: str) -> Any:
        """One step of a ring: send ``x`` to rank r + 1 (mod n) and return what rank r − 1 sent."""
        self.log.append(Collective("send", tensor, nbytes(x), 2))
        return self._shift(x)

    def recv(self, like: Any, /, *, src: int, tag: int = 0) -> Any:
        """The next array rank ``src`` sends this rank with ``tag``, shaped and typed like ``like`` (the
        sender logs it)."""
        return self._recv(like, src, tag)

    # The transport: a backend's subclass writes these.

    def _all_reduce(self, x: Any, groups: Groups, /) -> Any:
        raise NotImplementedError

    def _all_gather(self, shard: Any, groups: Groups, /) -> Any:
        raise NotImplementedError

    def _reduce_scatter(self, x: Any, groups: Groups, /) -> Any:
        raise NotImplementedError

    def _send(self, x: Any, dst: int, tag: int, /) -> None:
        raise NotImplementedError

    def _recv(self, like: Any, src: int, tag: int, /) -> Any:
        raise NotImplementedError

    def _shift(self, x: Any, /) -> Any:
        """A send and a receive; a transport whose ranks are not known apart when traced (JAX's
        ``ppermute``) writes it as one collective."""
        n, r = self.world_size, self.rank
        self._send(x, (r + 1) % n, 0)
        return self._recv(x, (r - 1) % n, 0)
