"""The transformer's configuration and parameters: `TransformerConfig`, `init_params`, save and load.

Parameters are a flat ``dict[str, array]`` named as below (DESIGN.md §3), so every backend, checkpoint
file and test speaks the same names. ``i`` counts layers from 0; shapes use D = d_model, N = n_heads,
K = n_kv_heads, H = head_dim, F = d_ff, V = vocab_size::

    embed                 (V, D)
    pos_embed             (max_seq_len, D)                          (position "learned")
    layers.{i}.attn_norm  (D,)         layers.{i}.mlp_norm  (D,)    (placement pre, sandwich, parallel)
    layers.{i}.post_attn_norm (D,)     layers.{i}.post_mlp_norm (D,)  (placement sandwich, post)
    layers.{i}.wq         (D, N, H)    layers.{i}.wk, wv    (D, K, H)    layers.{i}.wo  (N, H, D)
    layers.{i}.bq         (N, H)       layers.{i}.bk, bv    (K, H)   (qkv_bias)    layers.{i}.bo (D,) (o_bias)
    layers.{i}.q_norm     (H,)         layers.{i}.k_norm    (H,)     (qk_norm "head"; "projection": (N·H,), (K·H,))
    layers.{i}.w_in       (D, F)       layers.{i}.w_out     (F, D)       (relu, gelu, gelu_tanh, silu)
    layers.{i}.w_gate     (D, F)       layers.{i}.w_up      (D, F)       layers.{i}.w_down  (F, D)  (swiglu, geglu)
    layers.{i}.b_in, b_gate, b_up (F,) layers.{i}.b_out, b_down (D,)     (mlp_bias)
    norm                  (D,)
    lm_head               (D, V)       absent when ``tie_embeddings``: the logits are then ``h @ embed.T``

With ``norm_bias`` (LayerNorm only) every norm ``X`` above also has ``X_bias`` of its shape, after it.

`init_params` is plain NumPy and deterministic: the same config and seed give bit-identical arrays on
every machine, so a backend's parameters are ``be.asarray`` of the reference's.

>>> import tensorglot
>>> cfg = tensorglot.TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2,
...                                    head_dim=4, d_ff=32)
>>> params = tensorglot.init_params(cfg, seed=0)
>>> [(name, params[name].shape) for name in list(params)[:4]]
[('embed', (32, 16)), ('layers.0.attn_norm', (16,)), ('layers.0.wq', (16, 4, 4)), ('layers.0.wk', (16, 2, 4))]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from . import checks
from .param_layout import GATED, attention_shapes, block_norms, mlp_shapes, norm_names
from .rope_scaling import RopeScaling

#: The MLP kinds a config may name: the ops' activations, plus the gated ``swiglu`` (Llama) and ``geglu``
#: (Gemma: the tanh GELU as the gate).
MLP_ACTIVATIONS = (*checks.ACTIVATIONS, *GATED)
#: The float dtypes `init_params` can return.
PARAM_DTYPES = ("float64", "float32", "float16")


#: Where each block's norms sit (see `TransformerConfig.norm_placement`).
NORM_PLACEMENTS = ("pre", "sandwich", "post", "parallel")
NORM_KINDS = ("rms", "layer")
QK_NORMS = ("head", "projection")
POSITION_KINDS = ("rope", "learned", "none")


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer, validated on construction (a bad field raises ValueError/TypeError).

    Every field after ``tie_embeddings`` defaults to Llama's choice, so an older config (or saved
    params) loads unchanged.

    Attributes:
        vocab_size: V, tokens are ints in [0, V).
        d_model: D, the residual stream width.
        n_layers: the number of blocks.
        n_heads: N query heads.  n_kv_heads: K key/value heads, N % K == 0 (K = N is MHA, K = 1 MQA).
        head_dim: H; need not equal D / N (the projections are (D, N, H) and (N, H, D)).
        d_ff: F, the MLP's hidden width.
        activation: relu, gelu, gelu_tanh, silu (a plain MLP), swiglu or geglu (the gated MLPs).
        norm_eps: the norms' epsilon.
        rope_theta, rope_style, rotary_dim, rope_scaling: passed to `Encodings.rope` for q and k;
            ``rotary_dim`` None rotates all of H (partial rotary: an even number < H); a
            ``rope_scaling`` dict is stored as an immutable `RopeScaling` (the config is hashed).
        max_seq_len: the largest position a token may take (positions are in [0, max_seq_len)).
        tie_embeddings: the output projection is ``embed.T`` and ``lm_head`` is absent.
        norm_placement: ``pre`` ``h = x + attn(n(x))``; ``sandwich`` (Gemma 2) ``h = x + n'(attn(n(x)))``;
            ``post`` (OLMo 2) ``h = x + n'(attn(x))``; the MLP likewise on h; ``parallel`` (GPT-NeoX)
            ``x + attn(n(x)) + mlp(n''(x))``. n, n' and n'' are the block's own norms (names above).
        norm_kind: ``rms`` (`Ops.rms_norm`) or ``layer`` (`Ops.layer_norm`), for every norm but the QK-norm
            (always RMS).  norm_bias: LayerNorm's bias (``layer`` only).
        norm_offset: an RMSNorm multiplies by ``norm_offset + weight`` (Gemma: 1.0).
        qkv_bias, o_bias, mlp_bias: biases on the q/k/v projections, the output projection, the MLP's
            linears.
        qk_norm: None, ``head`` (RMSNorm over each head's H features of q and k, Qwen 3) or ``projection``
            (over the whole N·H / K·H projection, OLMo 2), before RoPE.
        windows: None (every layer full causal) or one entry per layer: None or a sliding window W, key j
            visible to query i iff i − W < j <= i.
        rope_thetas: None (``rope_theta`` everywhere) or one RoPE θ per layer.
        attn_scale: the attention's scale, None for 1/√H.
        attn_softcap, final_softcap: None or ``cap``: the attention scores or the logits become
            ``cap · tanh(x / cap)``.
        embed_scale: the embedding rows are multiplied by it (Gemma: √D).
        position: ``rope`` (q and k rotated), ``learned`` (``pos_embed`` rows added to the embeddings) or
            ``none``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    activation: str = "swiglu"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_style: str = "interleaved"
    rotary_dim: int | None = None
    rope_scaling: Mapping[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    norm_placement: str = "pre"
    norm_kind: str = "rms"
    norm_bias: bool = False
    norm_offset: float = 0.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None
    windows: tuple[int | None, ...] | None = None
    rope_thetas: tuple[float, ...] | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float = 1.0
    position: str = "rope"

    def __post_init__(self) -> None:
        fn = "TransformerConfig"
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "max_seq_len",
        ):  # stored as the int it holds: a NumPy scalar would not survive to_dict's JSON
            object.__setattr__(self, name, checks.check_positive_int(fn, name, getattr(self, name)))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{fn}: n_heads = {self.n_heads} must be a multiple of n_kv_heads = {self.n_kv_heads} "
                "(each kv head serves n_heads // n_kv_heads query heads)"
            )
        checks.check_choice(fn, "activation", self.activation, MLP_ACTIVATIONS)
        object.__setattr__(self, "norm_eps", checks.check_positive_float(fn, "norm_eps", self.norm_eps))
        object.__setattr__(self, "rope_theta", checks.check_positive_float(fn, "rope_theta", self.rope_theta))
        checks.check_choice(fn, "rope_style", self.rope_style, checks.ROPE_STYLES)
        if self.rotary_dim is not None:
            object.__setattr__(self, "rotary_dim", checks.check_positive_int(fn, "rotary_dim", self.rotary_dim))
        r = self.head_dim if self.rotary_dim is None else self.rotary_dim
        if r % 2 or r > self.head_dim:
            raise ValueError(f"{fn}: rotary_dim must be even and <= head_dim = {self.head_dim}, got {r}")
        checks.rope_scaling(fn, self.rope_scaling)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", RopeScaling(self.rope_scaling))
        for name in ("tie_embeddings", "norm_bias", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{fn}: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        checks.check_choice(fn, "norm_placement", self.norm_placement, NORM_PLACEMENTS)
        checks.check_choice(fn, "norm_kind", self.norm_kind, NORM_KINDS)
        checks.check_choice(fn, "position", self.position, POSITION_KINDS)
        if self.qk_norm is not None:
            checks.check_choice(fn, "qk_norm", self.qk_norm, QK_NORMS)
        if self.norm_bias and self.norm_kind != "layer":
            raise ValueError(f"{fn}: norm_bias needs norm_kind 'layer', got norm_kind {self.norm_kind!r}")
        if self.norm_offset and self.norm_kind != "rms":
            raise ValueError(f"{fn}: norm_offset is an RMSNorm's, got norm_kind {self.norm_kind!r}")
        if not isinstance(self.norm_offset, int | float) or isinstance(self.norm_offset, bool):
            raise TypeError(f"{fn}: norm_offset must be a number, got {type(self.norm_offset).__name__}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None:
                checks.check_positive_float(fn, name, getattr(self, name))
        checks.check_positive_float(fn, "embed_scale", self.embed_scale)
        if self.windows is not None:
            windows = self._per_layer(fn, "windows", self.windows)
            for w in windows:
                if w is not None:
                    checks.check_positive_int(fn, "windows[i]", w)
        if self.rope_thetas is not None:
            for theta in self._per_layer(fn, "rope_thetas", self.rope_thetas):
                checks.check_positive_float(fn, "rope_thetas[i]", theta)

    def _per_layer(self, fn: str, name: str, value: Any) -> tuple:
        # A tuple, not a list: the config is hashed (a JAX static argument) and frozen.
        if not isinstance(value, tuple) or len(value) != self.n_layers:
            raise ValueError(f"{fn}: {name} must be a tuple of n_layers = {self.n_layers} entries, got {value!r}")
        return value

    @property
    def group_size(self) -> int:
        """N // K: the query heads that share one kv head."""
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window, None for full causal attention."""
        return None if self.windows is None else self.windows[layer]

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (``rope_scaling`` a dict); `from_dict` reads it back."""
        out = asdict(self)
        out["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"TransformerConfig: unknown fields {sorted(unknown)}")
        data = dict(data)
        for name in ("windows", "rope_thetas"):  # JSON gives lists back
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)


def param_shapes(config: TransformerConfig, /) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in the canonical order (the order `init_params` draws in).

    >>> import tensorglot
    >>> from tensorglot.params import param_shapes
    >>> cfg = tensorglot.TransformerConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1,
    ...                                    head_dim=2, d_ff=8, activation="relu", tie_embeddings=True)
    >>> param_shapes(cfg)  # doctest: +NORMALIZE_WHITESPACE
    {'embed': (10, 4), 'layers.0.attn_norm': (4,), 'layers.0.wq': (4, 2, 2), 'layers.0.wk': (4, 1, 2),
     'layers.0.wv': (4, 1, 2), 'layers.0.wo': (2, 2, 4), 'layers.0.mlp_norm': (4,), 'layers.0.w_in': (4, 8),
     'layers.0.w_out': (8, 4), 'norm': (4,)}
    """
    c = config
    V, D = c.vocab_size, c.d_model
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, D)}
    if c.position == "learned":
        shapes["pos_embed"] = (c.max_seq_len, D)

    def norm(prefix: str, name: str | None) -> None:
        for n in norm_names(name, c) if name else ():
            shapes[prefix + n] = (D,)

    for i in range(c.n_layers):
        p = f"layers.{i}."
        attn_norm, post_attn_norm, mlp_norm, post_mlp_norm = block_norms(c)
        norm(p, attn_norm)
        shapes |= {p + k: v for k, v in attention_shapes(c).items()}
        norm(p, post_attn_norm)
        norm(p, mlp_norm)
        shapes |= {p + k: v for k, v in mlp_shapes(c).items()}
        norm(p, post_mlp_norm)
    norm("", "norm")
    if not c.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


_BIASES = ("bq", "bk", "bv", "bo", "b_in", "b_out", "b_gate", "b_up", "b_down")


def init_std(name: str, config: TransformerConfig, /) -> float:
    """The standard deviation `init_params` draws ``name`` with (0 for the norms, which start as the
    identity, and the biases, which start at 0).

    Scaled normal init: a projection's std is 1/√fan_in; the two that write into the residual stream
    (``wo`` and ``w_out``/``w_down``) are further scaled by 1/√(2·n_layers) (GPT-2, so the stream's
    variance does not grow with depth); ``embed`` has std 1/√D so tied logits ``h @ embed.T`` start
    with unit variance.
    """
    c = config
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith(("norm", "_bias")) or leaf in _BIASES:
        return 0.0
    residual = 1.0 / math.sqrt(2 * c.n_layers)
    fan_in = {
        "embed": c.d_model,
        "pos_embed": c.d_model,
        "wq": c.d_model,
        "wk": c.d_model,
        "wv": c.d_model,
        "wo": c.n_heads * c.head_dim,
        "w_in": c.d_model,
        "w_gate": c.d_model,
        "w_up": c.d_model,
        "w_out": c.d_ff,
        "w_down": c.d_ff,
        "lm_head": c.d_model,
    }[leaf]
    return (residual if leaf in ("wo", "w_out", "w_down") else 1.0) / math.sqrt(fan_in)


def init_params(config: TransformerConfig, /, seed: int, *, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Fresh parameters for ``config``: NumPy arrays, bit-identical for the same config and seed.

    One ``np.random.Generator(np.random.PCG64(seed))`` draws every array in `param_shapes` order as
    float64 standard normals (whose stream NumPy keeps stable across versions), scaled by `init_std`
    and only then cast to ``dtype`` — so the float32 parameters are the float64 ones rounded. Norm
    weights are ones.

    Args:
        config: the model.  seed: a non-negative int.  dtype: float64, float32 or float16.
    Returns:
        ``dict[str, np.ndarray]`` with the names and shapes of `param_shapes`.

    >>> import numpy as np, tensorglot
    >>> cfg = tensorglot.TransformerConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1,
    ...                                    head_dim=4, d_ff=8)
    >>> a, b = tensorglot.init_params(cfg, 7), tensorglot.init_params(cfg, 7)
    >>> all(np.array_equal(a[k], b[k]) for k in a), a["norm"].tolist(), a["embed"].dtype
    (True, [1.0, 1.0, 1.0, 1.0], dtype('float32'))
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"init_params: config must be a TransformerConfig, got {type(config).__name__}")
    seed = checks.check_positive_int("init_params", "seed", seed, allow_zero=True)
    checks.check_choice("init_params", "dtype", dtype, PARAM_DTYPES)
    rng = np.random.Generator(np.random.PCG64(seed))
    params = {}
    for name, shape in param_shapes(config).items():
        std = init_std(name, config)
        value = (
            rng.standard_normal(shape, dtype=np.float64) * std if std else np.full(shape, _init_constant(name, config))
        )
        params[name] = value.astype(dtype)
    return params


def _init_constant(name: str, config: TransformerConfig) -> float:
    """A norm weight starts as the identity (1 − norm_offset, so Gemma's 1 + w is 1); a bias at 0."""
    leaf = name.rsplit(".", 1)[-1]
    return 1.0 - config.norm_offset if leaf.endswith("norm") else 0.0


def check_params(fn: str, shapes: Mapping[str, tuple[int, ...]], config: TransformerConfig, /) -> None:
    """Raise unless ``shapes`` (name → shape of each given parameter) is exactly `param_shapes(config)`.

    Backends call it with ``{k: tuple(v.shape) for k, v in params.items()}``.
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
    wanted = param_shapes(config)
    missing = [k for k in wanted if k not in shapes]
    extra = [k for k in shapes if k not in wanted]
    if missing or extra:
        raise ValueError(f"{fn}: params do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        if tuple(shape) != wanted[name]:
            raise checks.bad_shape(fn, f"params[{name!r}]", shape, str(wanted[name]))


def check_tokens(
    fn: str,
    arg: str,
    shape: tuple[int, ...],
    lo: int,
    hi: int,
    config: TransformerConfig,
    /,
    *,
    start: int = 0,
) -> None:
    """Raise unless tokens of ``shape`` (B, S) with values in [lo, hi] fit the config.

    ``start`` is the first position they take (a cache's length): positions ``start .. start+S−1``
    must be < ``max_seq_len``. Backends pass ``int(tokens.min())``, ``int(tokens.max())``.
    """
    checks.check_rank(fn, arg, shape, "(B, S)")
    if shape[0] == 0 or shape[1] == 0:
        raise checks.bad_shape(fn, arg, shape, "(B, S) with B, S >= 1")
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(
            f"{fn}: {arg} must lie in [0, vocab_size) = [0, {config.vocab_size}), got values in [{lo}, {hi}]"
        )
    if start + shape[1] > config.max_seq_len:
        raise ValueError(
            f"{fn}: {arg} of length {shape[1]} starting at position {start} reach position "
            f"{start + shape[1] - 1}, past max_seq_len = {config.max_seq_len}"
        )


from .params_io import load_params, save_params  # noqa: E402 (they need TransformerConfig)

__all__ = ["RopeScaling", "TransformerConfig", "init_params", "param_shapes", "load_params", "save_params"]
