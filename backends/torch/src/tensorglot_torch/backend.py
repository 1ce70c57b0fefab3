"""The torch backend object: its namespaces are this package's modules, named as the spec's.

Arrays made by `asarray` live on ``TENSORGLOT_TORCH_DEVICE`` (read when the backend loads; default cpu),
so the conformance suite runs unchanged on a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from . import encodings, layers, ops, parallel
from ._common import DTYPES, dtype_name
from .plugin import CAPABILITIES


class TorchBackend:
    name = "torch"
    capabilities = CAPABILITIES
    ops = ops
    encodings = encodings
    layers = layers
    parallel = parallel

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or os.environ.get("TENSORGLOT_TORCH_DEVICE", "cpu"))

    def asarray(self, x: Any, /, dtype: str | None = None) -> torch.Tensor:
        if dtype is not None and dtype not in DTYPES:
            raise TypeError(f"asarray: the torch backend has no dtype {dtype!r} (it has {', '.join(DTYPES)})")
        t = (x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))).to(self.device)
        return t if dtype is None else t.to(DTYPES[dtype])

    def to_numpy(self, x: Any, /) -> np.ndarray:
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.cpu().numpy()

    def dtype_name(self, x: Any, /) -> str:
        return dtype_name(x) if isinstance(x, torch.Tensor) else str(np.asarray(x).dtype)

    def __repr__(self) -> str:
        return f"<tensorglot backend 'torch' on {self.device}>"
