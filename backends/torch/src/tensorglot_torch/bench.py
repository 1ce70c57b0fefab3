"""The torch backend's bench table (`tensorglot bench --backend torch`): ours against torch built-ins,
forward + backward, timed in the same process (medians of >= 5 after warm-up)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from tensorglot.bench import Row, ratio_row, time_median

from . import ops

OP_LIMIT = 1.3


def _sync(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(dy)

    return step


def _leaf(*shape: int, device: torch.device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()


def _pair(name, ours, base, inputs_ours, inputs_base, dy, *, sizes, repeats, device, note="") -> Row:
    sync = _sync(device)
    t_ours = time_median(_fwd_bwd(ours, inputs_ours, dy), repeats=repeats, warmup=2, sync=sync)
    t_base = time_median(_fwd_bwd(base, inputs_base, dy), repeats=repeats, warmup=2, sync=sync)
    return ratio_row(name, t_ours, t_base, limit=OP_LIMIT, sizes=sizes, note=note)


def op_rows(*, quick: bool, device: torch.device) -> Iterable[Row]:
    repeats = 5 if quick else 9
    B, S, N, H = (2, 128, 4, 32) if quick else (4, 512, 8, 64)
    D, Fh = (128, 512) if quick else (512, 2048)
    kw = dict(repeats=repeats, device=device)

    x = _leaf(B, N, S, S, device=device, seed=0)
    dy = torch.randn(B, N, S, S, device=device)
    yield _pair(
        "softmax fwd+bwd vs torch.softmax",
        lambda x: ops.softmax(x),
        lambda x: torch.softmax(x, -1),
        [x],
        [x],
        dy,
        sizes={"shape": f"{B}x{N}x{S}x{S}"},
        **kw,
    )

    x = _leaf(B * S, D, device=device, seed=1)
    w = _leaf(D, Fh, device=device, seed=2, scale=D**-0.5)
    b = _leaf(Fh, device=device, seed=3)
    w_t = w.detach().T.contiguous().requires_grad_()  # F.linear stores (out, in)
    dy = torch.randn(B * S, Fh, device=device)
    yield _pair(
        "linear fwd+bwd vs F.linear",
        lambda x, w, b: ops.linear(x, w, b),
        F.linear,
        [x, w, b],
        [x, w_t, b],
        dy,
        sizes={"M": B * S, "in": D, "out": Fh},
        **kw,
    )

    x = _leaf(B, S, 4 * D, device=device, seed=4)
    g = _leaf(4 * D, device=device, seed=5)
    dy = torch.randn(B, S, 4 * D, device=device)
    yield _pair(
        "rms_norm fwd+bwd vs F.rms_norm",
        lambda x, g: ops.rms_norm(x, g, eps=1e-6),
        lambda x, g: F.rms_norm(x, (4 * D,), g, eps=1e-6),
        [x, g],
        [x, g],
        dy,
        sizes={"shape": f"{B}x{S}x{4 * D}"},
        **kw,
    )

    q = _leaf(B, S, N, H, device=device, seed=6)
    k = _leaf(B, S, N, H, device=device, seed=7)
    v = _leaf(B, S, N, H, device=device, seed=8)
    dy = torch.randn(B, S, N, H, device=device)
    # SDPA's is_causal is top-left aligned; ours is bottom-right, so SDPA gets the explicit bottom-right mask.
    mask = ops._causal_mask(S, S, device)

    def sdpa(q, k, v):  # (B, S, N, H) ↔ SDPA's (B, N, S, H)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    yield _pair(
        "attention fwd+bwd vs SDPA (bool mask)",
        lambda q, k, v: ops.attention(q, k, v, causal=True),
        sdpa,
        [q, k, v],
        [q, k, v],
        dy,
        sizes={"B": B, "S": S, "N": N, "H": H},
        **kw,
    )

    x = _leaf(B * S, D, device=device, seed=9)
    w_in = _leaf(D, Fh, device=device, seed=10, scale=D**-0.5)
    w_out = _leaf(Fh, D, device=device, seed=11, scale=Fh**-0.5)
    seq = torch.nn.Sequential(torch.nn.Linear(D, Fh, bias=False), torch.nn.ReLU(), torch.nn.Linear(Fh, D, bias=False))
    seq = seq.to(device)
    dy = torch.randn(B * S, D, device=device)
    yield _pair(
        "mlp fwd+bwd vs nn.Sequential",
        lambda x, a, b: ops.mlp(x, a, b),
        seq,
        [x, w_in, w_out],
        [x],
        dy,
        sizes={"M": B * S, "D": D, "F": Fh},
        **kw,
    )


def rows(*, quick: bool = False) -> Iterable[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    yield from op_rows(quick=quick, device=device)
