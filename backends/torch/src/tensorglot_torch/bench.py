"""The torch backend's bench table (`tensorglot bench --backend torch`): ours against torch built-ins,
forward + backward, timed in the same process (medians of >= 5 after warm-up, ours and the baseline
alternating run by run)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from tensorglot.bench import Row, ratio_row, time_median
from tensorglot.params import TransformerConfig, init_params

from ._common import Frontend
from .nn import Transformer

ops, layers = Frontend("ops"), Frontend("layers")  # the spec's front ends of this backend

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


def _interleaved(
    ours: Callable[[], object],
    base: Callable[[], object],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], object] | None,
) -> tuple[float, float]:
    """Medians of ``repeats`` runs of each, alternating ours and the baseline run by run, so a change in
    the machine's load while timing falls on both sides alike."""
    for fn in (ours, base):
        time_median(fn, repeats=1, warmup=warmup, sync=sync)
    pairs = [
        (time_median(ours, repeats=1, warmup=0, sync=sync), time_median(base, repeats=1, warmup=0, sync=sync))
        for _ in range(repeats)
    ]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _pair(name, ours, base, inputs_ours, inputs_base, dy, *, sizes, repeats, device, note="") -> Row:
    t_ours, t_base = _interleaved(
        _fwd_bwd(ours, inputs_ours, dy),
        _fwd_bwd(base, inputs_base, dy),
        repeats=repeats,
        warmup=2,
        sync=_sync(device),
    )
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
    mask = ops.causal_mask(S, S).to(device)

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


# -- a training step: our Transformer vs the same architecture from torch built-ins --------------------


def _lin(w: torch.Tensor) -> torch.nn.Linear:
    """w (in, out) → an nn.Linear holding it as torch's (out, in)."""
    m = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    m.weight = torch.nn.Parameter(w.detach().T.contiguous())
    return m


class _BuiltinBlock(torch.nn.Module):
    def __init__(self, params: dict[str, torch.Tensor], p: str, c: TransformerConfig) -> None:
        super().__init__()
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        self.attn_norm = torch.nn.Parameter(params[p + "attn_norm"].detach().clone())
        self.wq = _lin(params[p + "wq"].reshape(D, N * H))
        self.wk = _lin(params[p + "wk"].reshape(D, K * H))
        self.wv = _lin(params[p + "wv"].reshape(D, K * H))
        self.wo = _lin(params[p + "wo"].reshape(N * H, D))
        self.mlp_norm = torch.nn.Parameter(params[p + "mlp_norm"].detach().clone())
        self.w_gate, self.w_up, self.w_down = (_lin(params[p + n]) for n in ("w_gate", "w_up", "w_down"))


class BuiltinTransformer(torch.nn.Module):
    """The spec's transformer (swiglu, NeoX RoPE, GQA) from nn.Embedding, nn.Linear, F.rms_norm and SDPA,
    holding the same parameters as ours (Linear weights transposed to torch's (out, in))."""

    def __init__(self, params: dict[str, torch.Tensor], config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = torch.nn.Embedding.from_pretrained(params["embed"].detach().clone(), freeze=False)
        self.blocks = torch.nn.ModuleList(_BuiltinBlock(params, f"layers.{i}.", config) for i in range(config.n_layers))
        self.norm = torch.nn.Parameter(params["norm"].detach().clone())
        self.lm_head = _lin(params["lm_head"])

    def rope(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, S, H), NeoX's rotate_half
        H, S = x.shape[-1], x.shape[-2]
        inv = self.config.rope_theta ** -(torch.arange(0, H, 2, dtype=torch.float32, device=x.device) / H)
        angle = (torch.arange(S, dtype=torch.float32, device=x.device)[:, None] * inv).to(x.dtype)  # (S, H/2)
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (S, H)
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, S = tokens.shape
        N, K, H, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
        x = self.embed(tokens)
        blk: _BuiltinBlock
        for blk in self.blocks:  # type: ignore[assignment]
            a = F.rms_norm(x, (c.d_model,), blk.attn_norm, eps=eps)
            q = self.rope(blk.wq(a).view(B, S, N, H).transpose(1, 2))  # (B, N, S, H)
            k = self.rope(blk.wk(a).view(B, S, K, H).transpose(1, 2))
            v = blk.wv(a).view(B, S, K, H).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # S == T: aligned
            x = x + blk.wo(y.transpose(1, 2).reshape(B, S, N * H))
            m = F.rms_norm(x, (c.d_model,), blk.mlp_norm, eps=eps)
            x = x + blk.w_down(F.silu(blk.w_gate(m)) * blk.w_up(m))
        return self.lm_head(F.rms_norm(x, (c.d_model,), self.norm, eps=eps))


def training_row(*, quick: bool, device: torch.device) -> Row:
    c = TransformerConfig(
        vocab_size=256,
        d_model=128 if quick else 256,
        n_layers=2 if quick else 4,
        n_heads=8,
        n_kv_heads=4,
        head_dim=16 if quick else 32,
        d_ff=384 if quick else 768,
        activation="swiglu",
        rope_style="neox",
        max_seq_len=512,
    )
    B, S = (4, 64) if quick else (8, 256)
    params = init_params(c, 0)
    ours = Transformer.from_params(params, c, device=device)
    theirs = BuiltinTransformer({k: torch.from_numpy(v) for k, v in params.items()}, c).to(device)
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, c.vocab_size, (B, S), generator=g).to(device) for _ in range(2))
    with torch.no_grad():  # the same function before timing anything
        gap = (ours(tokens) - theirs(tokens)).abs().max().item()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        ours.loss(tokens, targets).backward()
        opt_ours.step()

    def step_theirs() -> None:
        opt_theirs.zero_grad(set_to_none=True)
        F.cross_entropy(theirs(tokens).flatten(0, 1), targets.flatten()).backward()
        opt_theirs.step()

    t_ours, t_theirs = _interleaved(step_ours, step_theirs, repeats=5 if quick else 7, warmup=2, sync=_sync(device))
    sizes = {"B": B, "S": S, "D": c.d_model, "layers": c.n_layers, "N": c.n_heads, "K": c.n_kv_heads}
    return ratio_row(
        "train step (AdamW) vs built-in transformer",
        t_ours,
        t_theirs,
        limit=OP_LIMIT,
        sizes=sizes,
        note=f"max |logit difference| before training {gap:.1e}",
    )


# -- KV-cache generation vs recomputing the prefix ------------------------------------------------------


def generation_row(*, quick: bool, device: torch.device) -> Row:
    # Recomputation costs B·t tokens of work a step, a cached step one token plus a fixed Python cost per
    # op; the model and batch are big enough that the work, not that fixed cost, is what is compared.
    c = TransformerConfig(
        vocab_size=256,
        d_model=128 if quick else 512,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        head_dim=16 if quick else 64,
        d_ff=384 if quick else 1536,
        max_seq_len=512,
    )
    B, P, new = (2, 32, 32) if quick else (8, 96, 64)
    params = {k: torch.from_numpy(v).to(device) for k, v in init_params(c, 0).items()}
    prompt = torch.randint(0, c.vocab_size, (B, P), generator=torch.Generator().manual_seed(1)).to(device)
    outs: dict[str | None, torch.Tensor] = {}

    def run(cache: str | None) -> Callable[[], None]:
        def go() -> None:
            outs[cache] = layers.generate(params, c, prompt, max_new_tokens=new, cache=cache)

        return go

    sync = _sync(device)
    # One intra-op thread for both: a decoding step is ~200 tiny ops, and on a shared CPU each one that
    # is split across threads waits for a descheduled worker, which measures the scheduler, not the cache.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_cached, t_full = _interleaved(run("contiguous"), run(None), repeats=5, warmup=0, sync=sync)
    finally:
        torch.set_num_threads(threads)
    same = bool(torch.equal(outs["contiguous"], outs[None]))
    speedup = t_full / t_cached
    return Row(
        "generate: recomputation time / KV-cache time",
        speedup,
        "x faster",
        ratio=speedup,
        target=None if quick else ">= 20",
        met=same if quick else same and speedup >= 20,
        sizes={"B": B, "prompt": P, "new": new, "D": c.d_model, "layers": c.n_layers},
        note=f"tokens identical: {'yes' if same else 'NO'}; cached {t_cached:.3f} s, recomputed {t_full:.2f} s "
        "(medians of 5, one intra-op thread)",
    )


def rows(*, quick: bool = False) -> Iterable[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    yield from op_rows(quick=quick, device=device)
    yield training_row(quick=quick, device=device)
    yield generation_row(quick=quick, device=device)
    from .bench_kernels import kernel_rows
    from .parallel import parallel_rows
    from .serving.bench import serving_rows

    yield from kernel_rows(quick)
    yield from parallel_rows(quick)
    yield from serving_rows(quick=quick)
