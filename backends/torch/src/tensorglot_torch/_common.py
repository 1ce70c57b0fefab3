"""Helpers shared by the torch modules: dtype names, and (for layers not yet in the spec) input checks."""

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


def as_int(fn: str, arg: str, x: Any, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, device=device)
    checks.check_int(fn, arg, dtype_name(x))
    return x


def same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{k}={d}" for k, d in devices.items())
        raise TypeError(f"{fn}: inputs must be on one device, got {got}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Frontend:
    """``be.ops`` or ``be.encodings`` of the torch backend, looked up at each use (the backend imports
    the modules that use it). Transitional: for the torch layers until the spec's layers replace them."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def __getattr__(self, name: str) -> Any:
        import tensorglot

        return getattr(getattr(tensorglot.get_backend("torch"), self._namespace), name)


class _Untracked:
    """Stands in for ``ctx`` when autograd records nothing."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def kernel(function: type[torch.autograd.Function]) -> Any:
    """``function.apply``, or its forward alone when no input needs a gradient: apply's machinery costs
    about 15 µs a call, which a decoding step pays once per op."""
    forward = function.forward

    def call(*args: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return forward(_Untracked(), *args)

    return call
