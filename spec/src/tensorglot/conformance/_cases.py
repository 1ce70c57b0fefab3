"""The table of op cases: inputs (float64 NumPy, made from a seed), and how to call each backward.

A case's ``backward(fn, args, kwargs, y, dy)`` returns the gradients of the float arguments listed in
``wrt``, in that order, using the backend's explicit ``*_backward`` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

Make = Callable[[np.random.Generator], tuple[list[Any], dict[str, Any]]]
Backward = Callable[[Callable[[str], Callable[..., Any]], list[Any], dict[str, Any], Any, Any], tuple[Any, ...]]


@dataclass(frozen=True)
class Case:
    id: str
    namespace: str
    fn: str
    make: Make
    wrt: tuple[int, ...]  # positions of the float array arguments that get gradients
    backward: Backward | None
    scale: float = 1.0  # tolerance multiplier; the reason is a comment where the case is built
    laws: dict[str, Any] = field(default_factory=dict)


def _n(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def _softmax_case(id: str, shape: tuple[int, ...], axis: int) -> Case:
    return Case(
        id,
        "ops",
        "softmax",
        lambda rng: ([_n(rng, *shape) * 3], {"axis": axis}),
        (0,),
        lambda f, a, kw, y, dy: (f("softmax_backward")(y, dy, axis=kw["axis"]),),
    )


def _linear_case(id: str, xshape: tuple[int, ...], out: int, bias: bool) -> Case:
    def make(rng: np.random.Generator) -> tuple[list[Any], dict[str, Any]]:
        args = [_n(rng, *xshape), _n(rng, xshape[-1], out) / np.sqrt(xshape[-1])]
        if bias:
            args.append(_n(rng, out))
        return args, {}

    def backward(f: Any, a: list[Any], kw: dict[str, Any], y: Any, dy: Any) -> tuple[Any, ...]:
        dx, dw, db = f("linear_backward")(a[0], a[1], dy, bias=bias)
        return (dx, dw, db) if bias else (dx, dw)

    # A float32 dot product over `in` terms carries ~√in roundings: tolerance ×√in/2.
    return Case(
        id,
        "ops",
        "linear",
        make,
        (0, 1, 2) if bias else (0, 1),
        backward,
        scale=max(1.0, np.sqrt(xshape[-1]) / 2),
    )


def _mlp_case(activation: str) -> Case:
    def make(rng: np.random.Generator) -> tuple[list[Any], dict[str, Any]]:
        return [_n(rng, 2, 3, 6), _n(rng, 6, 10) / np.sqrt(6), _n(rng, 10, 6) / np.sqrt(10)], {"activation": activation}

    return Case(
        f"mlp-{activation}",
        "ops",
        "mlp",
        make,
        (0, 1, 2),
        lambda f, a, kw, y, dy: f("mlp_backward")(a[0], a[1], a[2], dy, activation=kw["activation"]),
        scale=2.0,  # two chained float32 matmuls
    )


def _attention_case(
    id: str,
    B: int,
    S: int,
    T: int,
    N: int,
    K: int,
    H: int,
    *,
    causal: bool = False,
    mask: str | None = None,
    scale: float | None = None,
    **options: Any,  # softcap, window
) -> Case:
    def make(rng: np.random.Generator) -> tuple[list[Any], dict[str, Any]]:
        kw: dict[str, Any] = {"causal": causal, **options}
        if mask == "random":
            kw["mask"] = rng.random((B, 1, S, T)) < 0.7
        elif mask == "padding":
            lengths = rng.integers(0, T + 1, size=B)
            kw["mask"] = (np.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
        if scale is not None:
            kw["scale"] = scale
        return [_n(rng, B, S, N, H), _n(rng, B, T, K, H), _n(rng, B, T, K, H)], kw

    return Case(
        id,
        "ops",
        "attention",
        make,
        (0, 1, 2),
        lambda f, a, kw, y, dy: f("attention_backward")(a[0], a[1], a[2], dy, **kw),
        scale=2.0,  # scores and the weighted sum are two reductions over H and T
    )


def _rope_case(id: str, shape: tuple[int, ...], **options: Any) -> Case:
    B, S = shape[:2]

    def make(rng: np.random.Generator) -> tuple[list[Any], dict[str, Any]]:
        kw = dict(options)
        if kw.pop("batch_positions", False):
            kw["positions"] = rng.integers(0, 64, size=(B, S))
        return [_n(rng, *shape)], kw

    return Case(
        id,
        "encodings",
        "rope",
        make,
        (0,),
        lambda f, a, kw, y, dy: (f("rope_backward")(dy, **kw),),
    )


def _gated_case(name: str) -> Case:
    def make(rng: np.random.Generator) -> tuple[list[Any], dict[str, Any]]:
        return [_n(rng, 3, 6), _n(rng, 6, 8) / 2.5, _n(rng, 6, 8) / 2.5, _n(rng, 8, 6) / 2.8], {}

    def backward(f: Any, a: list[Any], kw: dict[str, Any], y: Any, dy: Any) -> tuple[Any, ...]:
        return tuple(f(f"{name}_backward")(a[0], a[1], a[2], a[3], dy))

    return Case(name, "ops", name, make, (0, 1, 2, 3), backward, scale=2.0)  # three matmuls, a product of two


def _rms_norm_inputs(rng: np.random.Generator, *, offset: float) -> tuple[list[Any], dict[str, Any]]:
    return [_n(rng, 2, 3, 8) * 2, 1 - offset + 0.1 * _n(rng, 8)], {"eps": 1e-6, "offset": offset}


def _layer_norm_inputs(rng: np.random.Generator, *, bias: bool) -> tuple[list[Any], dict[str, Any]]:
    return [_n(rng, 2, 3, 8) * 2 + 1, 1 + 0.1 * _n(rng, 8)] + [0.1 * _n(rng, 8)] * bias, {}


CASES: list[Case] = [
    _softmax_case("softmax-last", (3, 7), -1),
    _softmax_case("softmax-axis0", (4, 3, 2), 0),
    _linear_case("linear-bias", (2, 3, 5), 4, True),
    _linear_case("linear-nobias", (4, 64), 8, False),
    *[_mlp_case(a) for a in ("relu", "gelu", "gelu_tanh", "silu")],
    *[_gated_case(name) for name in ("swiglu", "geglu")],
    *[
        Case(
            "rms_norm" if offset == 0 else "rms_norm-offset1",
            "ops",
            "rms_norm",
            partial(_rms_norm_inputs, offset=offset),
            (0, 1),
            lambda f, a, kw, y, dy: f("rms_norm_backward")(a[0], a[1], dy, **kw),
        )
        for offset in (0.0, 1.0)  # 1.0: Gemma's (1 + w), its weights near 0
    ],
    *[
        Case(
            f"layer_norm-{'bias' if with_bias else 'nobias'}",
            "ops",
            "layer_norm",
            partial(_layer_norm_inputs, bias=with_bias),
            (0, 1, 2) if with_bias else (0, 1),
            lambda f, a, kw, y, dy: f("layer_norm_backward")(a[0], a[1], dy, bias=len(a) == 3)[: len(a)],
        )
        for with_bias in (True, False)
    ],
    _attention_case("attention-mha", 2, 3, 3, 2, 2, 4),
    _attention_case("attention-gqa-causal-decode", 1, 2, 5, 4, 2, 3, causal=True),
    _attention_case("attention-mqa-causal", 2, 4, 4, 3, 1, 4, causal=True),
    _attention_case("attention-causal-s-gt-t", 1, 4, 2, 2, 1, 3, causal=True),  # first queries see nothing
    _attention_case("attention-mask", 2, 3, 4, 2, 2, 3, mask="random"),
    _attention_case("attention-padding-causal-scale", 2, 3, 3, 2, 1, 4, causal=True, mask="padding", scale=0.3),
    _attention_case("attention-softcap", 2, 3, 4, 2, 1, 3, softcap=0.7),  # scores ~ 1: the cap bends them
    _attention_case("attention-window-gqa-decode", 1, 3, 7, 4, 2, 3, causal=True, window=3),
    _attention_case("attention-window-s-gt-t", 1, 5, 3, 2, 1, 2, causal=True, window=2),
    _attention_case(
        "attention-window-softcap-padding", 2, 5, 5, 2, 2, 3, causal=True, mask="padding", window=2, softcap=1.5
    ),
    # one query per sequence and a mask: a paged pool's decoding step (rows of other lengths, an empty one)
    _attention_case("attention-decode-padding-gqa", 4, 1, 6, 4, 2, 3, causal=True, mask="padding"),
    _attention_case("attention-decode-mask", 2, 1, 5, 2, 2, 4, mask="random"),
    _attention_case(
        "attention-decode-window-softcap-padding", 3, 1, 7, 4, 1, 3, causal=True, mask="padding", window=3, softcap=1.5
    ),
    _rope_case("rope-interleaved", (2, 5, 2, 8)),
    _rope_case("rope-neox-partial", (1, 4, 3, 8), style="neox", rotary_dim=4),
    _rope_case("rope-batch-positions", (2, 3, 1, 6), batch_positions=True, theta=500.0),
    _rope_case("rope-linear", (1, 4, 2, 8), scaling={"type": "linear", "factor": 4.0}),
    _rope_case(
        "rope-dynamic",
        (1, 4, 2, 8),
        scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16, "seq_len": 64},
    ),
    _rope_case(
        "rope-yarn",
        (1, 4, 2, 16),
        style="neox",
        scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    _rope_case(
        "rope-llama3",
        (1, 4, 2, 16),
        scaling={
            "type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ),
]
