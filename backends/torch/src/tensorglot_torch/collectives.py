"""The spec's `Collectives` over a torch.distributed process group (gloo on CPU, NCCL on GPUs).

Sends are ``isend`` so that two neighbours that both send first cannot deadlock; `wait_sends` waits for
them at the step's end. A grouped collective's group is created by its own ranks at their first use of it
(``new_group`` with local synchronisation) and kept for the next steps.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot.parallel import Collectives
from tensorglot.parallel.collectives import Groups

# Fault injection for the tests, at a rank's first all-reduce (the other ranks wait in theirs):
# "R" makes rank R raise, "R:hang" makes it stop answering.
FAIL_RANK_ENV = "TENSORGLOT_PARALLEL_FAIL_RANK"

_GROUPS: dict[tuple[int, ...], Any] = {}  # by its ranks


def host(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as NumPy, bfloat16 widened to float32 (NumPy has none)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


class ProcessGroupCollectives(Collectives):
    def __init__(self, rank: int, world_size: int, *, fail: str | None = None) -> None:
        super().__init__(rank, world_size)
        self.fail = fail  # FAIL_RANK_ENV's value in the parent
        self.pending: list[Any] = []

    def _group(self, groups: Groups) -> Any:
        if groups is None:
            return None
        mine = self.group_of(groups)
        if mine not in _GROUPS:
            # Only the group's ranks make it (local synchronisation): a pipeline's stages reach their
            # first grouped collective at different times, and a world-wide new_group would wait for all.
            _GROUPS[mine] = dist.new_group(list(mine), use_local_synchronization=True)
        return _GROUPS[mine]

    def _inject_failure(self) -> None:
        rank, _, mode = (self.fail or "").partition(":")
        if self.fail and int(rank) == self.rank:
            if mode == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected failure on rank {self.rank} ({FAIL_RANK_ENV})")

    def _all_reduce(self, x: torch.Tensor, groups: Groups, /) -> torch.Tensor:
        self._inject_failure()
        buf = x.clone(memory_format=torch.contiguous_format)  # reduced in place
        dist.all_reduce(buf, group=self._group(groups))
        return buf

    def _all_gather(self, shard: torch.Tensor, groups: Groups, /) -> torch.Tensor:
        out = shard.new_empty((len(self.group_of(groups)) * shard.shape[0], *shard.shape[1:]))
        dist.all_gather_single(out, shard.contiguous(), group=self._group(groups))
        return out

    def _reduce_scatter(self, x: torch.Tensor, groups: Groups, /) -> torch.Tensor:
        out = x.new_empty((x.shape[0] // len(self.group_of(groups)), *x.shape[1:]))
        dist.reduce_scatter_single(out, x.contiguous(), group=self._group(groups))
        return out

    def _send(self, x: torch.Tensor, dst: int, tag: int, /) -> None:
        buf = x.contiguous()
        op = dist.P2POp(dist.isend, buf, dst, tag=tag)
        self.pending.append((buf, dist.batch_isend_irecv([op])))  # buf lives till waited

    def _recv(self, like: torch.Tensor, src: int, tag: int, /) -> torch.Tensor:
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, src, tag=tag)]):
            work.wait()
        return buf

    def wait_sends(self) -> None:
        for _, works in self.pending:
            for work in works:
                work.wait()
        self.pending.clear()
