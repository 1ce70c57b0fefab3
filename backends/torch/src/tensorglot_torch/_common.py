"""Helpers shared by the torch modules: input coercion, dtype/device agreement, the compute dtype."""

from __future__ import annotations

from typing import Any

import torch

from tensorglot import checks

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def as_float(fn: str, arg: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    checks.check_float(fn, arg, dtype_name(x))
    return x


def as_int(fn: str, arg: str, x: Any, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, device=device)
    checks.check_int(fn, arg, dtype_name(x))
    return x


def same_dtype(fn: str, **tensors: torch.Tensor | None) -> torch.dtype:
    """The one dtype (and device) of every present tensor; a TypeError naming both otherwise."""
    present = {k: v for k, v in tensors.items() if v is not None}
    checks.check_same_dtype(fn, {k: dtype_name(v) for k, v in present.items()})
    same_device(fn, **present)
    return next(iter(present.values())).dtype


def same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{k}={d}" for k, d in devices.items())
        raise TypeError(f"{fn}: inputs must be on one device, got {got}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat2d(x: torch.Tensor) -> torch.Tensor:
    """(..., n) → (prod(...), n), for weight gradients that sum over every leading axis."""
    return x.reshape(-1, x.shape[-1])
