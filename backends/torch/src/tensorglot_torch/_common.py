"""Helpers shared by the torch modules: dtype names, the kernels' autograd wrapper, the lazy front ends,
and the input check of parallel.py (which does not go through the spec's front ends yet)."""

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


class Frontend:
    """``be.ops``, ``be.encodings`` or ``be.layers`` of the torch backend, found at first use (for the
    bench modules, which the backend imports)."""

    def __init__(self, namespace: str) -> None:
        self._namespace, self._target = namespace, None

    def __getattr__(self, name: str) -> Any:
        if self._target is None:  # then kept: the registry's lock would break a torch.compile graph
            import tensorglot

            self._target = getattr(tensorglot.get_backend("torch"), self._namespace)
        return getattr(self._target, name)


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
