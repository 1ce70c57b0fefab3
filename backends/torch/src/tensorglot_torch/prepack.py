"""The kernels' ``inference`` scope: weights packed once a `generate` call for oneDNN's float32 product, which
reads a few rows' weights about twice as fast as MKL's (docs/torch.md, "Decoding's products")."""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tensorglot_torch_packs", default=None)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@contextlib.contextmanager
def inference(params):
    """Packs lazily only ``params``' CPU weights (a freed temporary's address may later hold other values)."""
    raw = os.environ.get("TENSORGLOT_TORCH_PACK_MB", "1024").strip()
    if not raw.replace(".", "", 1).isdigit():  # a plain decimal: no sign, exponent, inf or nan
        raise ValueError(f"TENSORGLOT_TORCH_PACK_MB must be the MiB of packed weights >= 0 (0: none), got {raw!r}")
    own = {t.untyped_storage().data_ptr() for t in params.values() if isinstance(t, torch.Tensor) and t.is_cpu}
    token = _SCOPE.set({"own": own, "left": float(raw) * 2**20, "packs": {}} if _ONEDNN and float(raw) else None)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def matmul(x, w):
    """``x @ w`` (w 2-D), over w's packed copy inside `inference`; one row stays MKL's faster matrix-vector product."""
    s = _SCOPE.get()
    if s is None or x.numel() == x.shape[-1] or x.dtype != torch.float32 or w.dtype != torch.float32 or not w.is_cpu:
        return x @ w
    if (key := (w.data_ptr(), tuple(w.shape), w.stride())) not in s["packs"]:
        if w.untyped_storage().data_ptr() not in s["own"] or s["left"] < 4 * w.numel() or torch.compiler.is_compiling():
            return x @ w
        s["left"] -= 4 * w.numel()
        s["packs"][key] = torch.ops.mkldnn._reorder_linear_weight(w.T)  # (out, in), in oneDNN's blocked layout
    return torch.ops.mkldnn._linear_pointwise(x, s["packs"][key], None, "none", [], "")
