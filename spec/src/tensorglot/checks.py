"""Input validation shared by every backend.

The checks work on shapes (tuples of ints) and dtype names (``"float32"`` ...), so a backend calls
them with ``x.shape`` and its own dtype name and every backend raises the same message: the function,
the argument, what it got and what it wanted.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
ROPE_STYLES = ("interleaved", "neox")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")

Shape = tuple[int, ...]


def _fmt(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def bad_shape(fn: str, arg: str, got: Sequence[int], wanted: str) -> ValueError:
    return ValueError(f"{fn}: {arg} has shape {_fmt(got)}, wanted {wanted}")


def check_float(fn: str, arg: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {arg} has dtype {dtype}, wanted a floating dtype ({', '.join(FLOAT_DTYPES)})")


def check_int(fn: str, arg: str, dtype: str) -> None:
    if dtype not in INT_DTYPES:
        raise TypeError(f"{fn}: {arg} has dtype {dtype}, wanted an integer dtype")


def check_ids(fn: str, arg: str, dtype: str, vocab_size: int) -> None:
    """Token ids: an integer dtype that holds every id in [0, vocab_size), so the ids `generate` appends
    in the prompt's dtype are never wrapped (uint8 holds a vocabulary of 256, int8 of 128)."""
    check_int(fn, arg, dtype)
    top = int(np.iinfo(dtype).max)
    if top < vocab_size - 1:
        raise TypeError(
            f"{fn}: {arg} (token ids) has dtype {dtype}, which holds ids up to {top} but vocab_size - 1 = "
            f"{vocab_size - 1}; wanted an integer dtype that holds every id in [0, {vocab_size}), e.g. int32 or int64"
        )


def check_bool(fn: str, arg: str, dtype: str) -> None:
    if dtype != "bool":
        raise TypeError(f"{fn}: {arg} has dtype {dtype}, wanted bool (True = attend)")


def check_same_dtype(fn: str, args: Mapping[str, str]) -> None:
    if len(set(args.values())) > 1:
        got = ", ".join(f"{k}={v}" for k, v in args.items())
        raise TypeError(f"{fn}: inputs must share one dtype, got {got}")


def check_rank(fn: str, arg: str, shape: Shape, names: str) -> None:
    """``names`` like ``"(B, S, N, H)"``: the rank is its number of letters."""
    rank = len(names.strip("()").split(","))
    if len(shape) != rank:
        raise bad_shape(fn, arg, shape, f"rank {rank} {names}")


def check_min_rank(fn: str, arg: str, shape: Shape, rank: int, names: str) -> None:
    if len(shape) < rank:
        raise bad_shape(fn, arg, shape, f"rank >= {rank} {names}")


def check_same_shape(fn: str, arg: str, shape: Shape, wanted: Shape, wanted_name: str) -> None:
    if tuple(shape) != tuple(wanted):
        raise bad_shape(fn, arg, shape, f"{_fmt(wanted)}, the shape of {wanted_name}")


def normalize_axis(fn: str, axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}: axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: axis {axis} is out of range for an input of rank {ndim}")
    return axis % ndim


def check_choice(fn: str, arg: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: unknown {arg} {value!r}, wanted one of {', '.join(choices)}")


def check_positive_int(fn: str, arg: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{fn}: {arg} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{fn}: {arg} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_positive_float(fn: str, arg: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``) as a float: inf and nan are refused, since no
    scale, epsilon or frequency is infinite; a NumPy scalar is the number it holds."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{fn}: {arg} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{fn}: {arg} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


# -- per-op checks: each returns the sizes the op needs --------------------------------------------


def linear(fn: str, x: Shape, w: Shape, b: Shape | None) -> tuple[int, int]:
    check_min_rank(fn, "x", x, 1, "(..., in)")
    check_rank(fn, "w", w, "(in, out)")
    if x[-1] != w[0]:
        raise bad_shape(fn, "w", w, f"({x[-1]}, out) to match x's last axis {x[-1]}")
    if b is not None and tuple(b) != (w[1],):
        raise bad_shape(fn, "b", b, f"({w[1]},), the out size of w")
    return w[0], w[1]


def mlp(fn: str, x: Shape, w_in: Shape, w_out: Shape) -> None:
    check_min_rank(fn, "x", x, 1, "(..., D)")
    check_rank(fn, "w_in", w_in, "(D, F)")
    check_rank(fn, "w_out", w_out, "(F, D)")
    if w_in[0] != x[-1]:
        raise bad_shape(fn, "w_in", w_in, f"({x[-1]}, F) to match x's last axis {x[-1]}")
    if tuple(w_out) != (w_in[1], x[-1]):
        raise bad_shape(fn, "w_out", w_out, f"({w_in[1]}, {x[-1]}): w_in's F = {w_in[1]} by x's D = {x[-1]}")


def swiglu(fn: str, x: Shape, w_gate: Shape, w_up: Shape, w_down: Shape) -> None:
    check_min_rank(fn, "x", x, 1, "(..., D)")
    check_rank(fn, "w_gate", w_gate, "(D, F)")
    if w_gate[0] != x[-1]:
        raise bad_shape(fn, "w_gate", w_gate, f"({x[-1]}, F) to match x's last axis {x[-1]}")
    check_same_shape(fn, "w_up", w_up, w_gate, "w_gate")
    check_rank(fn, "w_down", w_down, "(F, D)")
    if tuple(w_down) != (w_gate[1], x[-1]):
        raise bad_shape(fn, "w_down", w_down, f"({w_gate[1]}, {x[-1]}): w_gate's F = {w_gate[1]} by x's D = {x[-1]}")


def rms_norm(fn: str, x: Shape, weight: Shape, eps: Any) -> None:
    check_min_rank(fn, "x", x, 1, "(..., D)")
    if tuple(weight) != (x[-1],):
        raise bad_shape(fn, "weight", weight, f"({x[-1]},), x's last axis")
    check_positive_float(fn, "eps", eps)


def attention(
    fn: str, q: Shape, k: Shape, v: Shape, mask: Shape | None, scale: Any
) -> tuple[int, int, int, int, int, int]:
    """Returns (B, S, T, N, K, H)."""
    check_rank(fn, "q", q, "(B, S, N, H)")
    check_rank(fn, "k", k, "(B, T, K, H)")
    check_rank(fn, "v", v, "(B, T, K, H)")
    B, S, N, H = q
    if k[0] != B or k[3] != H:
        raise bad_shape(fn, "k", k, f"({B}, T, K, {H}) to match q's batch and head dim")
    T, K = k[1], k[2]
    check_same_shape(fn, "v", v, k, "k")
    if K == 0 or N % K != 0:
        raise ValueError(
            f"{fn}: q has N = {N} heads and k has K = {K}; N % K must be 0 (each kv head serves N // K "
            f"query heads), got shapes q {_fmt(q)} k {_fmt(k)}"
        )
    if mask is not None:
        if len(mask) > 4:
            raise bad_shape(fn, "mask", mask, f"broadcastable to (B, N, S, T) = {_fmt((B, N, S, T))}")
        full = (1,) * (4 - len(mask)) + tuple(mask)
        for got, want in zip(full, (B, N, S, T)):
            if got not in (1, want):
                raise bad_shape(fn, "mask", mask, f"broadcastable to (B, N, S, T) = {_fmt((B, N, S, T))}")
    if scale is not None:
        check_positive_float(fn, "scale", scale)
    return B, S, T, N, K, H


def rope(fn: str, x: Shape, positions: Shape | None, style: Any, rotary_dim: Any) -> int:
    """Returns r, the number of rotated features."""
    check_rank(fn, "x", x, "(B, S, N, H)")
    check_choice(fn, "style", style, ROPE_STYLES)
    H = x[3]
    r = H if rotary_dim is None else check_positive_int(fn, "rotary_dim", rotary_dim)
    if r % 2 or r > H:
        raise ValueError(f"{fn}: rotary_dim must be even and <= H = {H}, got {r}")
    if positions is not None and tuple(positions) not in ((x[1],), (x[0], x[1])):
        raise bad_shape(fn, "positions", positions, f"(S,) = ({x[1]},) or (B, S) = ({x[0]}, {x[1]})")
    return r


def rope_scaling(fn: str, scaling: Any) -> dict[str, Any] | None:
    """Validate a Hugging Face style ``rope_scaling`` dict and return it with defaults filled.

    Every number must lie in the domain its formula needs, so a bad one is a ValueError naming the key
    here, never a ``math domain error`` or a division by zero later: ``factor`` > 0, the original
    context >= 1, llama3's 0 < low_freq_factor < high_freq_factor, YaRN's betas > 0 and its optional
    mscale, mscale_all_dim >= 0 and attention_factor > 0, all finite.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(f"{fn}: scaling must be None or a dict with a 'type', got {type(scaling).__name__}")
    kind = scaling.get("type", scaling.get("rope_type"))
    check_choice(fn, "scaling type", kind, ROPE_SCALINGS)

    def number(key: str, default: Any = None, *, allow_zero: bool = False) -> Any:
        value = scaling.get(key, default)
        return None if value is None else check_positive_float(fn, f"scaling[{key!r}]", value, allow_zero=allow_zero)

    out: dict[str, Any] = {"type": kind, "factor": number("factor")}
    if out["factor"] is None:
        raise ValueError(f"{fn}: scaling {kind!r} needs 'factor'")
    if kind in ("dynamic", "yarn", "llama3"):
        orig = scaling.get("original_max_position_embeddings")
        if orig is None:
            raise ValueError(f"{fn}: scaling {kind!r} needs 'original_max_position_embeddings'")
        out["original_max_position_embeddings"] = check_positive_int(
            fn, "scaling['original_max_position_embeddings']", orig
        )
    if kind == "dynamic":
        # The sequence length the NTK base is stretched for; HF computes it per forward from the input.
        out["seq_len"] = check_positive_int(
            fn, "scaling['seq_len']", scaling.get("seq_len", out["original_max_position_embeddings"])
        )
    if kind == "llama3":
        out["low_freq_factor"] = number("low_freq_factor", 1.0)
        out["high_freq_factor"] = number("high_freq_factor", 4.0)
        if not out["high_freq_factor"] > out["low_freq_factor"]:
            raise ValueError(
                f"{fn}: llama3 scaling needs high_freq_factor > low_freq_factor, got "
                f"{out['high_freq_factor']} and {out['low_freq_factor']}"
            )
    if kind == "yarn":
        out["beta_fast"] = number("beta_fast", 32.0)
        out["beta_slow"] = number("beta_slow", 1.0)
        out["mscale"] = number("mscale", allow_zero=True)
        out["mscale_all_dim"] = number("mscale_all_dim", allow_zero=True)
        out["attention_factor"] = number("attention_factor")
    unknown = set(scaling) - set(out) - {"rope_type", "type"}
    if unknown:
        raise ValueError(f"{fn}: scaling {kind!r} got unknown keys {sorted(unknown)}")
    return out
