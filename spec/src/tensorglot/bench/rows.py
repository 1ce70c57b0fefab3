"""Every row of ``tensorglot bench``, run through a backend's public API (see `tensorglot.bench`)."""

from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import parallel
from ..params import TransformerConfig, init_params
from .harness import Context, Row, paired_medians, timings

OP_TARGET = "<= 1.3"  # ours within 30% of the framework's own op


def op_rows(ctx: Context) -> Iterator[Row]:
    o, e = ctx.be.ops, ctx.be.encodings
    B, S, N, K, H = (1, 64, 4, 2, 16) if ctx.quick else (2, 512, 8, 2, 64)
    M, D, F = (256, 128, 512) if ctx.quick else (2048, 1024, 4096)
    q, kv = (B, S, N, H), (B, S, K, H)
    cases: dict[str, tuple[Callable[..., Any], list[tuple[int, ...]]]] = {
        "softmax": (lambda x, dy: o.softmax_backward(o.softmax(x), dy), [(B, N, S, S)] * 2),
        "linear": (lambda x, w, b, dy: (o.linear(x, w, b), o.linear_backward(x, w, dy, bias=True)),
                   [(M, D), (D, F), (F,), (M, F)]),
        "mlp": (lambda x, a, b, dy: (o.mlp(x, a, b), o.mlp_backward(x, a, b, dy)), [(M, D), (D, F), (F, D), (M, D)]),
        "swiglu": (lambda x, g, u, d, dy: (o.swiglu(x, g, u, d), o.swiglu_backward(x, g, u, d, dy)),
                   [(M, D), (D, F), (D, F), (F, D), (M, D)]),
        "rms_norm": (lambda x, w, dy: (o.rms_norm(x, w), o.rms_norm_backward(x, w, dy)), [(M, D), (D,), (M, D)]),
        "attention": (lambda q, k, v, dy: (o.attention(q, k, v, causal=True),
                                           o.attention_backward(q, k, v, dy, causal=True)), [q, kv, kv, q]),
        "rope": (lambda x, dy: (e.rope(x), e.rope_backward(dy)), [q, q]),
    }  # fmt: skip
    for seed, (op, (fn, shapes)) in enumerate(cases.items()):
        dims = " ".join("x".join(map(str, s)) for s in shapes)
        yield ctx.timed(f"ops.{op}.fwd_bwd", fn, *ctx.arrays(*shapes, seed=seed), target=OP_TARGET, shapes=dims)


def mlp_times(ctx: Context, batch: int, d_model: int, d_ff: int, *, backward: bool, repeats: int) -> list[list[float]]:
    """Alternated times of the MLP (forward, plus its backward when asked), x @ w_in and h @ w_out through
    ``ops.linear``: the mlp row's and the roofline figure's measurements."""
    o = ctx.be.ops
    x, w_in, w_out, dy = ctx.arrays((batch, d_model), (d_model, d_ff), (d_ff, d_model), (batch, d_model))
    h = o.linear(x, w_in)  # (B, F)

    def mlp(x: Any, a: Any, b: Any, dy: Any) -> Any:
        return (o.mlp(x, a, b), o.mlp_backward(x, a, b, dy)) if backward else o.mlp(x, a, b)

    calls = ctx.call(mlp, x, w_in, w_out, dy), ctx.call(o.linear, x, w_in), ctx.call(o.linear, h, w_out)
    return timings(*calls, repeats=repeats)


def mlp_row(ctx: Context) -> Iterator[Row]:
    B, D, F = (256, 128, 512) if ctx.quick else (2048, 1024, 4096)
    t_mlp, t_mm, _ = map(statistics.median, mlp_times(ctx, B, D, F, backward=True, repeats=ctx.repeats))
    ours, mm = 12 * B * D * F / t_mlp / 1e9, 2 * B * D * F / t_mm / 1e9  # forward 2 matmuls, backward 4
    yield ctx.row("mlp.flops_vs_matmul", ours, "GFLOP/s", baseline=("ops.linear x @ w_in", mm), target=">= 0.7",
                  shapes=f"B={B} D={D} F={F}", counted="12·B·D·F (a recomputed x @ w_in is not)")  # fmt: skip


def flash_rows(ctx: Context) -> Iterator[Row]:
    names = ("flash.time_vs_naive", "flash.peak_memory_vs_naive")
    if "flash" not in ctx.be.capabilities:
        yield from (ctx.skipped(n, "the backend lacks the capability 'flash'") for n in names)
        return
    B, N, H, S, bs = (1, 2, 32, 512, 128) if ctx.quick else (1, 8, 64, 4096, 512)
    q, k, v = ctx.arrays(*[(B, S, N, H)] * 3)
    # partials of module functions, so a probe may send them to a fresh process
    flash = functools.partial(ctx.be.ops.flash_attention, causal=True, block_size=bs)
    naive = functools.partial(ctx.be.ops.attention, causal=True)
    t_flash, t_naive = paired_medians(ctx.call(flash, q, k, v), ctx.call(naive, q, k, v), repeats=ctx.repeats)
    dims: dict[str, Any] = {"shapes": f"B={B} S=T={S} N={N} H={H} causal", "block_size": bs}
    yield ctx.row(names[0], t_flash, "s", baseline=("ops.attention", t_naive), target="<= 1.25", **dims)
    m_flash, m_naive = (ctx.peak_memory(f, q, k, v) / 2**20 for f in (flash, naive))
    yield ctx.row(names[1], m_flash, "MiB", baseline=("ops.attention", m_naive), target="<= 0.125", **dims)


def window_rows(ctx: Context) -> Iterator[Row]:
    """Sliding-window flash attention (Mistral's, Gemma 2's local layers) against full causal flash attention
    at the same sizes: the window's key tiles are skipped, so its time goes as S·W rather than S²/2."""
    names = ("flash.window.time_vs_causal", "flash.window.peak_memory_vs_causal")
    if "flash" not in ctx.be.capabilities:
        yield from (ctx.skipped(n, "the backend lacks the capability 'flash'") for n in names)
        return
    B, N, H, S, W, bs = (1, 2, 32, 512, 64, 64) if ctx.quick else (1, 8, 64, 4096, 512, 512)
    q, k, v = ctx.arrays(*[(B, S, N, H)] * 3, seed=1)
    window = functools.partial(ctx.be.ops.flash_attention, causal=True, window=W, block_size=bs)
    causal = functools.partial(ctx.be.ops.flash_attention, causal=True, block_size=bs)
    t_window, t_causal = paired_medians(ctx.call(window, q, k, v), ctx.call(causal, q, k, v), repeats=ctx.repeats)
    dims: dict[str, Any] = {"shapes": f"B={B} S=T={S} N={N} H={H} W={W}", "block_size": bs}
    # tiles visited: the window's ⌈W/bs⌉ + 1 per query tile (one fewer for the first) against causal's i + 1
    yield ctx.row(names[0], t_window, "s", baseline=("flash causal", t_causal), target="<= 0.6", **dims)
    m_window, m_causal = (ctx.peak_memory(f, q, k, v) / 2**20 for f in (window, causal))
    yield ctx.row(names[1], m_window, "MiB", baseline=("flash causal", m_causal), target="<= 1.1", **dims)


def _model(ctx: Context, config: TransformerConfig) -> dict[str, Any]:
    return {k: ctx.be.asarray(v, "float32") for k, v in init_params(config, 0).items()}


def _tokens(ctx: Context, config: TransformerConfig, *shape: int, seed: int) -> Any:
    return ctx.be.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), "int64")


def generate_times(ctx: Context, config: TransformerConfig, prompt_len: int, new: int, *, repeats: int = 5,
                   batch: int = 1):  # fmt: skip
    """Median seconds of ``layers.generate`` with a contiguous KV cache and recomputing the prefix at every
    step (alternated), and whether the two gave the same tokens. Both run under the backend's ``serial``
    probe (one intra-op thread where it has one): a decoding step is ~100 tiny ops, and on a shared CPU each
    one split across threads waits for a descheduled worker, which measures the scheduler, not the cache."""
    params, prompt = _model(ctx, config), _tokens(ctx, config, batch, prompt_len, seed=1)
    out: dict[str | None, Any] = {}

    def run(cache: str | None) -> Callable[[], None]:
        gen = functools.partial(ctx.be.layers.generate, params, config, prompt, max_new_tokens=new, cache=cache)
        return lambda: out.update({cache: ctx.sync(gen())})

    with ctx.extra.get("serial", contextlib.nullcontext)():
        t_cached, t_full = paired_medians(run("contiguous"), run(None), repeats=repeats)
    return t_cached, t_full, bool(np.array_equal(*(ctx.be.to_numpy(t) for t in out.values())))


def _config(quick: bool, **kw: Any) -> TransformerConfig:
    sizes: dict[str, Any] = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    if not quick:
        sizes = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768)
    return TransformerConfig(vocab_size=256, max_seq_len=256, **sizes, **kw)


def layer_rows(ctx: Context) -> Iterator[Row]:
    if "layers" not in ctx.be.capabilities:
        for name in ("generate.cached_vs_recompute", "train.value_and_grad"):
            yield ctx.skipped(name, "the backend lacks the capability 'layers'")
        return
    # Recomputation costs B·t tokens of work a step, a cached step B tokens plus a fixed cost per op: the
    # model and batch are big enough that the work, not that fixed cost, is what is compared.
    config = _config(ctx.quick)
    if not ctx.quick:
        config = TransformerConfig(vocab_size=256, max_seq_len=512, d_model=512, n_layers=2, n_heads=8,
                                   n_kv_heads=4, head_dim=64, d_ff=1536)  # fmt: skip
    B, P, new = (2, 8, 24) if ctx.quick else (8, 96, 64)
    t_cached, t_full, same = generate_times(ctx, config, P, new, batch=B)
    yield ctx.row("generate.cached_vs_recompute", t_cached, "s", baseline=("generate(cache=None)", t_full),
                  target="<= 0.05", same=same, B=B, prompt=P, new=new, D=config.d_model, layers=config.n_layers,
                  same_tokens=same)  # fmt: skip
    config, (B, S) = _config(ctx.quick, activation="swiglu"), ((2, 32) if ctx.quick else (8, 256))
    args = _tokens(ctx, config, B, S, seed=2), _tokens(ctx, config, B, S, seed=3), _model(ctx, config), config
    # ours as a user calls it; the baseline is the framework's compiler on the same step
    yield ctx.timed("train.value_and_grad", ctx.be.layers.value_and_grad, *args, jit=False, B=B, S=S)


def parallel_rows(ctx: Context, n: int = 2) -> Iterator[Row]:
    if ctx.be.parallel is None:  # a backend without strategies (xp): every row says so
        for s in parallel.STRATEGIES:
            yield ctx.skipped(f"parallel.{s}.step_vs_single", "the backend has no parallel strategies")
        return
    q = ctx.quick
    shape = parallel.MLPShape(layers=4, batch=32 if q else 256, d_model=64 if q else 512, d_ff=256 if q else 2048)
    raw, x, dy = parallel.init_mlp(shape)
    params = {k: v.astype(np.float32) for k, v in raw.items()}
    x, dy = x.astype(np.float32), dy.astype(np.float32)
    par, most = ctx.be.parallel, ctx.be.parallel.max_world_size()
    single = parallel.median_seconds(lambda: par.single_step(params, x, dy), repeats=ctx.repeats)
    for s in parallel.STRATEGIES:
        missing = sorted(set(parallel.STRATEGY_CAPABILITIES[s]) - set(ctx.be.capabilities))
        if missing or (most is not None and most < n):
            why = f"lacks {missing}" if missing else f"has {most} devices, wants {n}"
            yield ctx.skipped(f"parallel.{s}.step_vs_single", f"the backend {why}")
            continue
        kw: dict[str, Any] = {"microbatches": 4} if s == "pp" else {}
        step = functools.partial(par.step, params, x, dy, strategy=s, world_size=n, **kw)
        t = parallel.median_seconds(step, repeats=ctx.repeats)
        yield ctx.row(f"parallel.{s}.step_vs_single", t, "s", baseline=("single_step", single), devices=n,
                      bytes_per_device=step().bytes_per_device,
                      model_bytes=parallel.step_cost(s, shape, n, **kw).bytes_per_device)  # fmt: skip


SERVING_RUNS = 3
SERVING = (("ttft_p50_s", "ttft_p50", "s", None), ("tpot_p99_s", "tpot_p99", "s", "<= 1"),
           ("itl_p99_s", "itl_p99", "s", None), ("tokens_per_s", "tokens_per_s", "tokens/s", None))  # fmt: skip


def serving_rows(ctx: Context) -> Iterator[Row]:
    """Short chats decoding while long prompts arrive (a colocated server stalls them for each prefill)."""
    from .. import serving
    from ..registry import registry

    why = "no serving transport is installed" if not registry().transports() else None
    if "layers" not in ctx.be.capabilities or why:
        for _, label, _, _ in SERVING:
            yield ctx.skipped(f"serving.{label}.disagg_vs_coloc", why or "the backend lacks the capability 'layers'")
        return
    rng, V = np.random.default_rng(0), serving.DEMO_MODEL["vocab_size"]
    # Long prompts arrive every 25 ms, about as fast as one prefill takes here, so prefill is what a
    # colocated server does most while the chats decode: the regime disaggregation is for. A long request
    # decodes 16 tokens (15 gaps): with 4, its TPOT over 3 gaps was the handoff's one gap, not the decode.
    chats, longs, long_len, new = (4, 4, 192, 24) if ctx.quick else (8, 8, 384, 48)
    prompts = [(rng.integers(0, V, 16), new, 0.0) for _ in range(chats)]
    prompts += [(rng.integers(0, V, long_len), new // 3, 0.025 * (j + 1)) for j in range(longs)]
    requests = [serving.Request(i, p, n, arrival_s=at) for i, (p, n, at) in enumerate(prompts)]
    model = serving.Model(ctx.be.name, serving.DEMO_MODEL, seed=0)
    # The whole workload is served SERVING_RUNS times in each mode, alternating: a p99 of 16 requests is
    # their slowest, which one scheduling accident on a shared machine moves 3-fold, so a row is the
    # median run's figure (the rest of the bench's rule: medians, ours and the baseline alternating).
    runs = [[serving.serve(requests, model, colocated=mode) for mode in (False, True)]
            for _ in range(1 if ctx.quick else SERVING_RUNS)]  # fmt: skip
    tokens = [[r["tokens"] for r in out["requests"]] for pair in runs for out in pair]
    same = all(t == tokens[0] for t in tokens)
    for key, label, unit, target in SERVING:
        d, c = ([pair[m]["summary"][key] for pair in runs] for m in (0, 1))
        yield ctx.row(f"serving.{label}.disagg_vs_coloc", statistics.median(d), unit, target=target,
                      baseline=("colocated", statistics.median(c)), same=same, requests=len(requests),
                      runs=len(runs), disaggregated=_rounded(d), colocated=_rounded(c), same_tokens=same)  # fmt: skip


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.4g}") for v in values]


def prefix_rows(ctx: Context) -> Iterator[Row]:
    """Requests sharing a long prompt prefix, one after another, through the server's engine with and without
    its prefix cache (`tensorglot.serving.measure.prefix_cache_effect`): prompt tokens computed and TTFT."""
    names = ("serving.prefix.computed_vs_uncached", "serving.prefix.ttft_p50_vs_uncached")
    if "layers" not in ctx.be.capabilities:
        yield from (ctx.skipped(n, "the backend lacks the capability 'layers'") for n in names)
        return
    from ..serving.measure import prefix_cache_effect

    n, shared = (4, 128) if ctx.quick else (8, 384)
    m = prefix_cache_effect(ctx.be.name, requests=n, shared=shared)
    dims: dict[str, Any] = {"workload": m["workload"], "same_tokens": m["same_tokens"]}
    # every prompt but the first finds its shared blocks cached: computed ≈ 1/n of the shared part + own tokens
    yield ctx.row(names[0], m["on"]["computed"], "tokens", baseline=("no prefix cache", m["off"]["computed"]),
                  target="<= 0.5", same=m["same_tokens"], **dims)  # fmt: skip
    yield ctx.row(names[1], m["on"]["ttft_p50_s"], "s", baseline=("no prefix cache", m["off"]["ttft_p50_s"]),
                  target="<= 1", same=m["same_tokens"], **dims)  # fmt: skip


#: The row groups by name (`tensorglot bench --only`), in the order a run takes them.
GROUPS = {"ops": op_rows, "mlp": mlp_row, "flash": flash_rows, "window": window_rows, "layers": layer_rows,
          "parallel": parallel_rows, "serving": serving_rows, "prefix": prefix_rows}  # fmt: skip
ROWS = tuple(GROUPS.values())
