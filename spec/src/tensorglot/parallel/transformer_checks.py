"""The checks a transformer step passes before any rank starts: its strategy, the mesh's sizes, what
they must divide, and a pipeline's microbatches and chunks (see `transformer`)."""

from __future__ import annotations

import math

from ..params import TransformerConfig, param_shapes
from .schedules import SCHEDULES, ZERO_BUBBLE
from .step import default_tp_size

TRANSFORMER_STRATEGIES = (
    "dp",
    "zero1",
    "zero2",
    "fsdp",
    "tp",
    "tp_sp",
    "cp",
    "pp",
    "dp_tp",
    "dp_pp",
    "tp_pp",
    "dp_tp_pp",
    "fsdp_tp",
)
PIPELINES = ("pp", "dp_pp", "tp_pp", "dp_tp_pp")  # the strategies that run a pipeline schedule
PIPELINE_SCHEDULES = (*SCHEDULES, "interleaved", ZERO_BUBBLE)
#: The architecture fields a parallel step honours only at these values (every other config field is free).
LLAMA_BLOCK = {"norm_placement": "pre", "norm_kind": "rms", "norm_bias": False, "norm_offset": 0.0,
               "qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": None, "windows": None,
               "attn_scale": None, "attn_softcap": None, "final_softcap": None, "embed_scale": 1.0,
               "position": "rope"}  # fmt: skip


def check_transformer_step(
    config: TransformerConfig,
    batch: int,
    seq: int,
    strategy: str,
    world_size: int,
    *,
    microbatches: int | None = None,
    schedule: str = "1f1b",
    tp_size: int | None = None,
    pp_size: int | None = None,
) -> tuple[int, int, int]:
    """Raise ValueError for a step that cannot run (before any process starts); else the microbatch
    count, the tp size and the pp size (the dp size is n / (tp·pp)): tp = n for tp and tp_sp, pp = n for
    pp; ``tp_size`` and ``pp_size`` choose them on a mesh (default: the largest divisor <= √ of what is
    left), and tp_pp's pp is n / tp.

    >>> cfg = TransformerConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=16)
    >>> check_transformer_step(cfg, 4, 6, "tp", 8)
    Traceback (most recent call last):
    ...
    ValueError: transformer_step: tp needs n_heads = 4 divisible by the tp size = 8
    >>> check_transformer_step(cfg, 8, 6, "dp_tp_pp", 8)   # (m, tp, pp): a 2 × 2 × 2 mesh
    (2, 2, 2)
    """
    fn, n, c = "transformer_step", world_size, config
    other = {f: getattr(c, f) for f, default in LLAMA_BLOCK.items() if getattr(c, f) != default}
    if other:  # the units (`transformer_blocks`) are the pre-norm Llama block; the rest is not split yet
        raise ValueError(f"{fn}: the parallel step runs the Llama block (pre-RMSNorm, no biases, RoPE); "
                         f"this config sets {other}")  # fmt: skip
    if strategy not in TRANSFORMER_STRATEGIES:
        raise ValueError(f"{fn}: unknown strategy {strategy!r}, wanted one of {', '.join(TRANSFORMER_STRATEGIES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: world_size must be a positive int, got {n!r}")

    def divides(what: str, size: int, by: int, by_name: str = "world_size") -> None:
        if size % by:
            raise ValueError(f"{fn}: {strategy} needs {what} = {size} divisible by {by_name} = {by}")

    def size_of(name: str, value: int | None, of: int) -> int:
        size = default_tp_size(of) if value is None else value
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or of % size:
            raise ValueError(f"{fn}: {strategy} needs {name} dividing {of}, got {value!r}")
        return size

    tp = n if strategy in ("tp", "tp_sp") else 1
    pp = n if strategy == "pp" else 1
    if strategy in ("dp_tp", "tp_pp", "dp_tp_pp", "fsdp_tp"):
        tp = size_of("tp_size", tp_size, n)
    if strategy == "tp_pp":
        pp = n // tp
    elif strategy in ("dp_pp", "dp_tp_pp"):
        pp = size_of("pp_size", pp_size, n // tp)
    d = n // (tp * pp)
    if d > 1 and strategy.startswith(("dp_", "fsdp_")):
        divides("batch", batch, d, "the dp size")
    if strategy in ("dp", "zero1", "zero2", "fsdp"):
        divides("batch", batch, n)
    if strategy in ("zero1", "zero2", "fsdp"):
        for name, shape in param_shapes(c).items():
            divides(f"{name}'s size", math.prod(shape), n)
    if tp > 1 or strategy in ("tp", "tp_sp", "dp_tp", "tp_pp", "dp_tp_pp", "fsdp_tp"):
        t = tp
        divides("n_heads", c.n_heads, t, "the tp size")
        divides("d_ff", c.d_ff, t, "the tp size")
        if c.n_kv_heads % t and t % c.n_kv_heads:
            raise ValueError(f"{fn}: {strategy} needs n_kv_heads = {c.n_kv_heads} to divide or be divided by {t}")
    if strategy == "tp_sp":
        divides("the sequence length", seq, n)
    if strategy == "fsdp_tp":
        for name, shape in param_shapes(c).items():
            parts = 1 if name.endswith("norm") or name in ("embed", "lm_head") else tp
            if name.endswith((".wk", ".wv")) and c.n_kv_heads % tp:
                parts = c.n_kv_heads
            divides(f"{name}'s tensor-parallel piece", math.prod(shape) // parts, d, "the fsdp size")
    if strategy == "cp":
        divides("the sequence length", seq, 2 * n, "2·world_size (a head and a tail chunk per rank)")
    m = 1
    if strategy in ("pp", "dp_pp", "tp_pp", "dp_tp_pp"):
        m = pp if microbatches is None else microbatches
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"{fn}: microbatches must be a positive int, got {microbatches!r}")
        divides("n_layers", c.n_layers, pp, "the pp size")
        divides("the batch per replica", batch // d, m, "microbatches")
        if schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"{fn}: unknown schedule {schedule!r}, wanted one of {', '.join(PIPELINE_SCHEDULES)}")
        if c.tie_embeddings:
            raise ValueError(f"{fn}: {strategy} needs untied embeddings (embed and the head are on two stages)")
    elif microbatches not in (None, 1):
        raise ValueError(f"{fn}: microbatches are pp's; {strategy} got {microbatches!r}")
    return m, tp, pp


def check_chunks(config: TransformerConfig, schedule: str, stages: int, microbatches: int, chunks: int | None) -> int:
    """The chunks per pipeline device: ``chunks`` (default 2) for the interleaved schedule, else 1; a
    ValueError when they do not divide the layers or the microbatches not the stages."""
    fn = "transformer_step"
    if schedule != "interleaved":
        if chunks not in (None, 1):
            raise ValueError(f"{fn}: chunks are the interleaved schedule's; {schedule} got {chunks!r}")
        return 1
    v = 2 if chunks is None else chunks
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or config.n_layers % (stages * v):
        raise ValueError(f"{fn}: interleaved needs chunks dividing n_layers / stages = {config.n_layers}/{stages}")
    if microbatches % stages:
        raise ValueError(f"{fn}: interleaved needs microbatches = {microbatches} a multiple of stages = {stages}")
    return v
