"""torch's part of ``tensorglot bench``: built-in baselines and probes, keyed by row (see `tensorglot.bench`)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import tensorglot
from tensorglot.bench.harness import rss_peak

from . import layers


def _autograd(f: Callable[..., torch.Tensor]) -> Callable[..., Callable[[], Any]]:
    """A baseline from ``f``: its forward, then autograd's gradients for the row's last argument, dy."""

    def make(*args: torch.Tensor) -> Callable[[], Any]:
        xs = [x.detach().requires_grad_() for x in args[:-1]]
        leaves = xs + (list(f.parameters()) if isinstance(f, torch.nn.Module) else [])
        return lambda: torch.autograd.grad(f(*xs), leaves, args[-1])

    return make


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    S, T = q.shape[1], k.shape[1]
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)  # bottom-right; is_causal is top-left

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, S, N, H) ↔ (B, N, S, H)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    return _autograd(sdpa)(q, k, v, dy)


def _sequential(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    lin = [torch.nn.Linear(w.shape[0], w.shape[1], bias=False, device=x.device) for w in (w_in, w_out)]
    for m, w in zip(lin, (w_in, w_out)):
        m.weight = torch.nn.Parameter(w.detach().T.contiguous())  # nn.Linear holds (out, in)
    return _autograd(torch.nn.Sequential(lin[0], torch.nn.ReLU(), lin[1]))(x, dy)


def peak_memory(fn: Callable[..., Any], *args: torch.Tensor) -> int:
    if args[0].is_cuda:  # the caching allocator's own peak
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return rss_peak(fn, torch.from_numpy, [a.numpy() for a in args])  # the CPU allocator is not tracemalloc's


def baselines() -> dict[str, Any]:
    torch._logging.set_logs(dynamo=logging.ERROR)  # our checks' .item() breaks graphs: the row says what it costs
    be = tensorglot.get_backend("torch")

    def autograd_step(tokens: Any, targets: Any, params: Any, config: Any) -> Any:
        return layers.autograd_value_and_grad(lambda p: be.layers.loss(tokens, targets, p, config), params)

    compiled = torch.compile(autograd_step)  # autograd through our forward, compiled: the fast torch baseline

    def compiled_step(*args: Any) -> Any:
        with warnings.catch_warnings():  # tracing warns of array_api_compat's lru_cache and its own copies
            warnings.simplefilter("ignore", UserWarning)
            return compiled(*args)

    cuda = be.default_device.type == "cuda"  # type: ignore[attr-defined]
    return {
        "ops.softmax.fwd_bwd": ("torch.softmax", _autograd(lambda x: torch.softmax(x, -1))),
        "ops.linear.fwd_bwd": ("F.linear", _autograd(lambda x, w, b: F.linear(x, w.T, b))),
        "ops.mlp.fwd_bwd": ("nn.Sequential", _sequential),
        "ops.rms_norm.fwd_bwd": ("F.rms_norm", _autograd(lambda x, w: F.rms_norm(x, w.shape, w, eps=1e-6))),
        "ops.attention.fwd_bwd": ("SDPA, bool mask", _sdpa),
        "train.value_and_grad": ("torch.compile", lambda *args: lambda: compiled_step(*args)),
        "sync": (lambda out: torch.cuda.synchronize()) if cuda else (lambda out: out),
        "peak_memory": peak_memory,
        "serial": _one_thread,
    }


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
