"""The JAX backend's benchmark table (`tensorglot bench --backend jax`): jitted forward + backward of our
ops against JAX's own in the same process, and cached greedy generation against recomputation.

Every timed function is jitted and warmed up (compiled) first; times are medians of >= 5 runs, each
ending in ``block_until_ready``, ours and the baseline alternating so that load from other processes
falls on both. The backward pass is taken against a fixed random cotangent, so no
op's gradient is trivially zero (the gradient of ``sum(softmax(x))`` is, and XLA would know it).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tensorglot.bench import Row, ratio_row, time_median
from tensorglot.params import TransformerConfig, init_params

from ._common import lazy_frontend
from .bench_kernels import kernel_rows

ops, layers = lazy_frontend("ops"), lazy_frontend("layers")


def _interleaved(
    ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int, *, warmup: int = 2
) -> tuple[float, float]:
    """Medians of ``repeats`` runs of each, alternating, so a load spike on a shared machine hits both."""
    for f in (ours, theirs):
        for _ in range(warmup):  # the first compiles
            f()
    pairs = [(time_median(ours, repeats=1, warmup=0), time_median(theirs, repeats=1, warmup=0)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _ready(f: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], Any]:
    f = jax.jit(f)
    return lambda: jax.block_until_ready(f(*args))


def _fwd_bwd(f: Callable[..., Any], n_args: int, cotangent: Any) -> Callable[..., Any]:
    """x ↦ (f(x), ∇ of <f(x), cotangent> with respect to every argument)."""
    return jax.value_and_grad(lambda *a: jnp.vdot(f(*a), cotangent), argnums=tuple(range(n_args)))


def _compare(
    name: str,
    ours: Callable[..., Any],
    theirs: Callable[..., Any],
    args: tuple[Any, ...],
    out_shape: tuple,
    sizes: dict[str, Any],
    repeats: int,
    note: str,
) -> Row:
    dy = jax.random.normal(jax.random.key(1), out_shape)
    t_ours, t_theirs = _interleaved(
        _ready(_fwd_bwd(ours, len(args), dy), args), _ready(_fwd_bwd(theirs, len(args), dy), args), repeats
    )
    return ratio_row(name, t_ours, t_theirs, limit=1.2, sizes=sizes, note=note)


def rows(*, quick: bool = False) -> Iterator[Row]:
    repeats = 5 if quick else 9
    keys = iter(jax.random.split(jax.random.key(0), 16))
    normal = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731

    n, d = (256, 512) if quick else (2048, 1024)
    x = normal(n, d)
    yield _compare(
        "softmax fwd+bwd vs jax.nn.softmax",
        lambda a: ops.softmax(a),
        jax.nn.softmax,
        (x,),
        (n, d),
        {"rows": n, "cols": d},
        repeats,
        "float32",
    )
    w = normal(d)

    def plain_rms(a, g):
        return a * jax.lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + 1e-6) * g

    yield _compare(
        "rms_norm fwd+bwd vs plain jnp",
        lambda a, g: ops.rms_norm(a, g),
        plain_rms,
        (x, w),
        (n, d),
        {"rows": n, "D": d},
        repeats,
        "gradients for x and weight",
    )

    B, S, N, K, H = (2, 64, 8, 2, 32) if quick else (4, 256, 8, 2, 64)
    q, k, v = normal(B, S, N, H), normal(B, S, K, H), normal(B, S, K, H)
    mask = jnp.tril(jnp.ones((S, S), bool))[None, None]  # (1, 1, S, T) explicit causal mask, S == T
    yield _compare(
        "attention fwd+bwd vs jax.nn.dot_product_attention",
        lambda a, b, c: ops.attention(a, b, c, mask=mask),
        lambda a, b, c: jax.nn.dot_product_attention(a, b, c, mask=mask),
        (q, k, v),
        (B, S, N, H),
        {"B": B, "S": S, "N": N, "K": K, "H": H},
        repeats,
        "GQA, an explicit causal mask on both sides",
    )

    tokens, D, F = (256, 256, 1024) if quick else (2048, 512, 2048)
    xm, w_in, w_out = normal(tokens, D), normal(D, F) / D**0.5, normal(F, D) / F**0.5
    yield _compare(
        "mlp fwd+bwd vs plain jnp",
        lambda a, b, c: ops.mlp(a, b, c),
        lambda a, b, c: jax.nn.relu(a @ b) @ c,
        (xm, w_in, w_out),
        (tokens, D),
        {"tokens": tokens, "D": D, "F": F},
        repeats,
        "relu",
    )
    yield _generation_row(quick, repeats)
    yield from kernel_rows(quick)


def _generation_row(quick: bool, repeats: int) -> Row:
    P, new = (8, 56) if quick else (16, 240)  # recompute costs ~L² per token: the speed-up grows with L
    config = TransformerConfig(
        vocab_size=512,
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        head_dim=32,
        d_ff=768,
        max_seq_len=P + new,
    )
    params = {k: jnp.asarray(v) for k, v in init_params(config, 0).items()}
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, P)), jnp.int32)

    def run(cache: str | None) -> Callable[[], Any]:
        return lambda: jax.block_until_ready(layers.generate(params, config, prompt, max_new_tokens=new, cache=cache))

    cached, recomputed = run("contiguous"), run(None)
    same = bool(jnp.array_equal(cached(), recomputed()))  # also compiles both
    t_cached, t_recomputed = _interleaved(cached, recomputed, 5, warmup=0)  # both ran once just above
    speedup = t_recomputed / t_cached
    return Row(
        "greedy generate: KV cache speed-up over recompute",
        speedup,
        "x",
        ratio=speedup,
        target=">= 20",
        met=speedup >= 20 and same,
        sizes={"P": P, "new": new, "D": 256, "layers": 4, "V": 512},
        note=f"identical tokens: {same}; both one jitted fori_loop, recompute reruns the (P+new) buffer",
    )
