"""The ``torch.distributed`` transport of `tensorglot.serving` (see its `Transport` protocol).

gloo on CPU; NCCL when CUDA gives every rank its own device. The threads, deadlines and the watchdog
are the spec's (`tensorglot.serving.p2p`, with the gloo pitfalls they avoid); this module posts the
``isend``s and ``irecv``s. NumPy arrays travel through ``torch.from_numpy`` (no copy on CPU).
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot.serving.p2p import PointToPointTransport
from tensorglot.serving.transport import PayloadSpec


def _posted(work: Any) -> Any:
    assert work is not None, "isend/irecv in a group this rank belongs to returns a Work"
    return work


class TorchTransport(PointToPointTransport):
    def __init__(self, rank: int, world_size: int, *, address: str, timeout_s: float, payload_spec: PayloadSpec):
        nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size and dist.is_nccl_available()
        self.device = torch.device("cuda", rank) if nccl else torch.device("cpu")
        if nccl:
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if nccl else "gloo",
            init_method=address,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(hours=1),  # idle receives wait on it; transfers have their own
        )
        super().__init__(rank, world_size, timeout_s=timeout_s, payload_spec=payload_spec)

    def _native(self, a: np.ndarray, /) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _isend(self, x: torch.Tensor, dst: int, /) -> Any:
        return _posted(dist.isend(x, dst))

    def _irecv(self, src: int, shape: tuple[int, ...], dtype: str, /) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        return buf, _posted(dist.irecv(buf, src))

    def _host(self, buf: torch.Tensor, /) -> np.ndarray:
        return buf.cpu().numpy()

    def barrier(self) -> None:
        dist.barrier()
