"""The transformer's configuration and parameters: `TransformerConfig`, `init_params`, save and load.

Parameters are a flat ``dict[str, array]`` named as below (DESIGN.md §3), so every backend, checkpoint
file and test speaks the same names. ``i`` counts layers from 0; shapes use D = d_model, N = n_heads,
K = n_kv_heads, H = head_dim, F = d_ff, V = vocab_size::

    embed                 (V, D)
    layers.{i}.attn_norm  (D,)         layers.{i}.mlp_norm  (D,)
    layers.{i}.wq         (D, N, H)    layers.{i}.wk, wv    (D, K, H)    layers.{i}.wo  (N, H, D)
    layers.{i}.w_in       (D, F)       layers.{i}.w_out     (F, D)       (relu, gelu, gelu_tanh, silu)
    layers.{i}.w_gate     (D, F)       layers.{i}.w_up      (D, F)       layers.{i}.w_down  (F, D)  (swiglu)
    norm                  (D,)
    lm_head               (D, V)       absent when ``tie_embeddings``: the logits are then ``h @ embed.T``

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

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from . import checks

#: The MLP kinds a config may name: the ops' activations, plus Llama's gated ``swiglu``.
MLP_ACTIVATIONS = (*checks.ACTIVATIONS, "swiglu")
#: The float dtypes `init_params` can return.
PARAM_DTYPES = ("float64", "float32", "float16")


class RopeScaling(Mapping[str, Any]):
    """An immutable, hashable ``rope_scaling`` mapping: a frozen config cannot change under a jit key.

    `TransformerConfig` turns the dict it is given into one (its items sorted); it reads like the dict,
    equals it, pickles, and ``dict(scaling)`` gives the dict back (`TransformerConfig.to_dict` does).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = tuple(sorted(dict(items).items()))
        try:
            hash(self._items)
        except TypeError:
            wanted = "numbers or strings"
            raise TypeError(f"TransformerConfig: rope_scaling values must be {wanted}, got {dict(items)}") from None

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return RopeScaling, (dict(self._items),)

    def __repr__(self) -> str:
        return f"RopeScaling({dict(self._items)!r})"


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer, validated on construction (a bad field raises ValueError/TypeError).

    Attributes:
        vocab_size: V, tokens are ints in [0, V).
        d_model: D, the residual stream width.
        n_layers: the number of blocks.
        n_heads: N query heads.  n_kv_heads: K key/value heads, N % K == 0 (K = N is MHA, K = 1 MQA).
        head_dim: H; need not equal D / N (the projections are (D, N, H) and (N, H, D)).
        d_ff: F, the MLP's hidden width.
        activation: relu, gelu, gelu_tanh, silu (a plain MLP) or swiglu (the gated MLP).
        norm_eps: RMSNorm's epsilon.
        rope_theta, rope_style, rotary_dim, rope_scaling: passed to `Encodings.rope` for q and k;
            ``rotary_dim`` None rotates all of H (partial rotary: an even number < H); a
            ``rope_scaling`` dict is stored as an immutable `RopeScaling` (the config is hashed).
        max_seq_len: the largest position a token may take (positions are in [0, max_seq_len)).
        tie_embeddings: the output projection is ``embed.T`` and ``lm_head`` is absent.
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
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"{fn}: tie_embeddings must be a bool, got {type(self.tie_embeddings).__name__}")

    @property
    def group_size(self) -> int:
        """N // K: the query heads that share one kv head."""
        return self.n_heads // self.n_kv_heads

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
    V, D, N, K, H, F = c.vocab_size, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, D)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes |= {p + "attn_norm": (D,), p + "wq": (D, N, H), p + "wk": (D, K, H), p + "wv": (D, K, H)}
        shapes |= {p + "wo": (N, H, D), p + "mlp_norm": (D,)}
        if c.activation == "swiglu":
            shapes |= {p + "w_gate": (D, F), p + "w_up": (D, F), p + "w_down": (F, D)}
        else:
            shapes |= {p + "w_in": (D, F), p + "w_out": (F, D)}
    shapes["norm"] = (D,)
    if not c.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_std(name: str, config: TransformerConfig, /) -> float:
    """The standard deviation `init_params` draws ``name`` with (0 for the norm weights, which are ones).

    Scaled normal init: a projection's std is 1/√fan_in; the two that write into the residual stream
    (``wo`` and ``w_out``/``w_down``) are further scaled by 1/√(2·n_layers) (GPT-2, so the stream's
    variance does not grow with depth); ``embed`` has std 1/√D so tied logits ``h @ embed.T`` start
    with unit variance.
    """
    c = config
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("attn_norm", "mlp_norm", "norm"):
        return 0.0
    residual = 1.0 / math.sqrt(2 * c.n_layers)
    fan_in = {
        "embed": c.d_model,
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
        value = np.ones(shape) if std == 0.0 else rng.standard_normal(shape, dtype=np.float64) * std
        params[name] = value.astype(dtype)
    return params


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


# -- save and load (no pickle) ---------------------------------------------------------------------

_CONFIG_KEY = "__config__"


def save_params(
    path: str | os.PathLike[str], params: Mapping[str, Any], /, *, config: TransformerConfig | None = None
) -> None:
    """Write ``params`` (NumPy arrays) to ``.npz`` or ``.safetensors`` (chosen by the suffix).

    The config, when given, is stored as JSON beside them (a string array in ``.npz``, the metadata in
    safetensors). Nothing is pickled: an array that is not bool, int or float (an object array) is a
    TypeError; safetensors needs the ``safetensors`` package.
    """
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()}
    for k, v in arrays.items():
        if v.dtype.kind not in "biuf":  # an object or string array would be pickled (npz) or unreadable
            raise TypeError(
                f"save_params: params[{k!r}] has dtype {v.dtype}; wanted a numeric dtype (bool, int, float): "
                "nothing is pickled"
            )
    if _CONFIG_KEY in arrays:
        raise ValueError(f"save_params: {_CONFIG_KEY!r} is reserved for the config, not a parameter name")
    meta = None if config is None else json.dumps(config.to_dict())
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path, metadata=None if meta is None else {_CONFIG_KEY: meta})
    elif path.endswith(".npz"):
        payload: dict[str, Any] = dict(arrays)
        if meta is not None:
            payload[_CONFIG_KEY] = np.array(meta)  # a unicode array: loads without pickle
        np.savez(path, **payload)
    else:
        raise ValueError(f"save_params: path must end in .npz or .safetensors, got {path!r}")


def load_params(path: str | os.PathLike[str], /) -> tuple[dict[str, np.ndarray], TransformerConfig | None]:
    """Read what `save_params` wrote: ``(params, config or None)``. ``.npz`` loads with allow_pickle=False."""
    path = os.fspath(path)
    meta: str | None = None
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        params = load_file(path)
        with safe_open(path, framework="numpy") as fh:
            meta = (fh.metadata() or {}).get(_CONFIG_KEY)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            params = {k: data[k] for k in data.files if k != _CONFIG_KEY}
            if _CONFIG_KEY in data.files:
                meta = str(data[_CONFIG_KEY])
    else:
        raise ValueError(f"load_params: path must end in .npz or .safetensors, got {path!r}")
    return params, None if meta is None else TransformerConfig.from_dict(json.loads(meta))
