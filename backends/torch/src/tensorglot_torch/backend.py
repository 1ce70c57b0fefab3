"""The torch backend: the kernels behind the spec's front ends, and torch's array adapter.

Arrays made by `asarray` live on ``TENSORGLOT_TORCH_DEVICE`` (read when the backend loads; default cpu),
so the conformance suite runs unchanged on a GPU.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tensorglot.backend import ArrayBackend

from . import layers, ops, parallel
from ._common import DTYPES, dtype_name
from .plugin import CAPABILITIES


class TorchBackend(ArrayBackend):
    name = "torch"
    capabilities = CAPABILITIES
    kernels = SimpleNamespace(
        **{
            k: v
            for m in (ops, layers)
            for k, v in vars(m).items()
            if callable(v) and not k.startswith("_") and not isinstance(v, type)
        }
    )
    parallel = parallel

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.default_device = torch.device(device or os.environ.get("TENSORGLOT_TORCH_DEVICE", "cpu"))

    @property
    def bench(self) -> Any:
        import importlib

        return importlib.import_module(".bench", __package__)

    def asarray(self, x: Any, /, dtype: str | None = None) -> torch.Tensor:
        if dtype is not None and dtype not in DTYPES:
            raise TypeError(f"asarray: the torch backend has no dtype {dtype!r} (it has {', '.join(DTYPES)})")
        t = (x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))).to(self.default_device)
        return t if dtype is None else t.to(DTYPES[dtype])

    def native(self, x: Any, /) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=self.default_device)

    def to_numpy(self, x: Any, /) -> np.ndarray:
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        return x.detach().to(torch.float32 if x.dtype == torch.bfloat16 else x.dtype).cpu().numpy()

    def dtype_name(self, x: Any, /) -> str:
        return dtype_name(x) if isinstance(x, torch.Tensor) else str(np.asarray(x).dtype)

    def astype(self, x: torch.Tensor, dtype: str, /) -> torch.Tensor:
        return x.to(DTYPES[dtype])

    def device(self, x: torch.Tensor, /) -> torch.device:
        return x.device

    def __repr__(self) -> str:
        return f"<tensorglot backend 'torch' on {self.default_device}>"
