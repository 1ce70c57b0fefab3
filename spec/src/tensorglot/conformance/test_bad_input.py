"""Bad input raises ValueError/TypeError naming the function, the argument, what it got and wanted."""

from __future__ import annotations

import numpy as np
import pytest


def f32(*shape):
    return ("float32", np.ones(shape))


def i32(*shape):
    return ("int32", np.ones(shape, dtype=np.int64))


# (id, namespace, function, positional args, keyword args, exception, substrings of the message)
BAD = [
    ("softmax-int", "ops", "softmax", [i32(2, 3)], {}, TypeError, ["softmax", "x", "int"]),
    ("softmax-axis", "ops", "softmax", [f32(2, 3)], {"axis": 2}, ValueError, ["softmax", "axis 2"]),
    ("linear-inner", "ops", "linear", [f32(2, 3), f32(4, 5)], {}, ValueError, ["linear", "w", "(4, 5)", "3"]),
    (
        "linear-bias",
        "ops",
        "linear",
        [f32(2, 3), f32(3, 5), f32(4)],
        {},
        ValueError,
        ["linear", "b", "(4,)", "(5,)"],
    ),
    ("linear-rank", "ops", "linear", [f32(2, 3), f32(3)], {}, ValueError, ["linear", "w", "(3,)", "rank 2"]),
    (
        "mlp-act",
        "ops",
        "mlp",
        [f32(2, 3), f32(3, 4), f32(4, 3)],
        {"activation": "tanh"},
        ValueError,
        ["mlp", "activation", "tanh", "relu"],
    ),
    (
        "mlp-shape",
        "ops",
        "mlp",
        [f32(2, 3), f32(3, 4), f32(5, 3)],
        {},
        ValueError,
        ["mlp", "w_out", "(5, 3)"],
    ),
    (
        "swiglu-up",
        "ops",
        "swiglu",
        [f32(2, 3), f32(3, 4), f32(3, 5), f32(4, 3)],
        {},
        ValueError,
        ["swiglu", "w_up", "(3, 5)", "(3, 4)"],
    ),
    (
        "rms-weight",
        "ops",
        "rms_norm",
        [f32(2, 4), f32(3)],
        {},
        ValueError,
        ["rms_norm", "weight", "(3,)", "(4,)"],
    ),
    ("rms-int", "ops", "rms_norm", [i32(2, 4), f32(4)], {}, TypeError, ["rms_norm", "x"]),
    (
        "attn-rank",
        "ops",
        "attention",
        [f32(2, 3, 4), f32(2, 3, 2, 4), f32(2, 3, 2, 4)],
        {},
        ValueError,
        ["attention", "q", "(2, 3, 4)", "(B, S, N, H)"],
    ),
    (
        "attn-gqa",
        "ops",
        "attention",
        [f32(1, 2, 3, 4), f32(1, 2, 2, 4), f32(1, 2, 2, 4)],
        {},
        ValueError,
        ["attention", "N % K", "3", "2"],
    ),
    (
        "attn-head-dim",
        "ops",
        "attention",
        [f32(1, 2, 2, 4), f32(1, 2, 2, 8), f32(1, 2, 2, 8)],
        {},
        ValueError,
        ["attention", "k", "(1, 2, 2, 8)"],
    ),
    (
        "attn-v",
        "ops",
        "attention",
        [f32(1, 2, 2, 4), f32(1, 3, 2, 4), f32(1, 2, 2, 4)],
        {},
        ValueError,
        ["attention", "v", "(1, 2, 2, 4)"],
    ),
    (
        "attn-mask-shape",
        "ops",
        "attention",
        [f32(1, 2, 2, 4), f32(1, 3, 2, 4), f32(1, 3, 2, 4)],
        {"mask": ("bool", np.ones((3, 3), bool))},
        ValueError,
        ["attention", "mask", "(3, 3)", "broadcastable"],
    ),
    (
        "attn-mask-dtype",
        "ops",
        "attention",
        [f32(1, 2, 2, 4), f32(1, 2, 2, 4), f32(1, 2, 2, 4)],
        {"mask": f32(2, 2)},
        TypeError,
        ["attention", "mask", "bool"],
    ),
    *[
        ("attn-" + id, "ops", fn, [f32(1, 2, 2, 4)] * (4 if fn.endswith("backward") else 3), kw, exc, [fn, *words])
        for fn in ("attention", "attention_backward")
        for id, kw, exc, words in [
            ("window-not-causal", {"window": 2}, ValueError, ["window", "causal=True"]),
            ("window-zero", {"causal": True, "window": 0}, ValueError, ["window", "> 0", "0"]),
            ("window-float", {"causal": True, "window": 2.0}, TypeError, ["window", "int", "float"]),
            ("softcap-negative", {"softcap": -1.0}, ValueError, ["softcap", "> 0", "-1.0"]),
        ]
    ],
    ("rms-offset-nan", "ops", "rms_norm", [f32(2, 4), f32(4)], {"offset": float("nan")}, ValueError, ["offset"]),
    (
        "geglu-down",
        "ops",
        "geglu",
        [f32(2, 3), f32(3, 4), f32(3, 4), f32(5, 3)],
        {},
        ValueError,
        ["geglu", "w_down", "(5, 3)"],
    ),
    (
        "padding-too-long",
        "ops",
        "padding_mask",
        [("int32", np.array([1, 5]))],
        {"t": None},
        ValueError,
        ["padding_mask", "lengths"],
    ),
    (
        "sinusoidal-odd",
        "encodings",
        "sinusoidal",
        [],
        {"seq_len": 4, "dim": 5},
        ValueError,
        ["sinusoidal", "dim", "even"],
    ),
    ("rope-rank", "encodings", "rope", [f32(2, 3, 4)], {}, ValueError, ["rope", "x", "(B, S, N, H)"]),
    (
        "rope-style",
        "encodings",
        "rope",
        [f32(1, 2, 1, 4)],
        {"style": "gptj"},
        ValueError,
        ["rope", "style", "gptj", "interleaved", "neox"],
    ),
    (
        "rope-odd-rotary",
        "encodings",
        "rope",
        [f32(1, 2, 1, 8)],
        {"rotary_dim": 3},
        ValueError,
        ["rope", "rotary_dim", "even", "3"],
    ),
    (
        "rope-rotary-too-big",
        "encodings",
        "rope",
        [f32(1, 2, 1, 8)],
        {"rotary_dim": 10},
        ValueError,
        ["rope", "rotary_dim", "8", "10"],
    ),
    (
        "rope-positions",
        "encodings",
        "rope",
        [f32(1, 2, 1, 8)],
        {"positions": i32(3)},
        ValueError,
        ["rope", "positions", "(3,)"],
    ),
    (
        "rope-float-positions",
        "encodings",
        "rope",
        [f32(1, 2, 1, 8)],
        {"positions": f32(2)},
        TypeError,
        ["rope", "positions"],
    ),
    ("rope-int-x", "encodings", "rope", [i32(1, 2, 1, 8)], {}, TypeError, ["rope", "x"]),
    (
        "rope-scaling",
        "encodings",
        "rope",
        [f32(1, 2, 1, 8)],
        {"scaling": {"type": "ntk", "factor": 2.0}},
        ValueError,
        ["rope", "scaling", "ntk", "yarn"],
    ),
    (
        "freq-scaling-missing",
        "encodings",
        "rope_frequencies",
        [],
        {"dim": 8, "scaling": {"type": "llama3", "factor": 8.0}},
        ValueError,
        ["rope_frequencies", "original_max_position_embeddings"],
    ),
    # Options outside their domain (issue 14): no infinite scale or epsilon, no division by zero later.
    *[
        (
            f"attn-scale-{v}",
            "ops",
            "attention",
            [f32(1, 2, 2, 4)] * 3,
            {"scale": v},
            ValueError,
            ["attention", "scale", w],
        )
        for v, w in ((float("inf"), "inf"), (float("nan"), "nan"), (-1.0, "-1.0"))
    ],
    *[
        (f"{op}-eps-{v}", "ops", op, [f32(2, 4), f32(4)], {"eps": v}, ValueError, [op, "eps", w, "finite"])
        for op in ("rms_norm", "layer_norm")
        for v, w in ((float("inf"), "inf"), (float("nan"), "nan"), (-1e-6, "-1e-06"))
    ],
    (
        "mlp-out-width",
        "ops",
        "mlp",
        [f32(2, 3), f32(3, 4), f32(4, 5)],
        {},
        ValueError,
        ["mlp", "w_out", "(4, 5)", "(4, 3)"],
    ),
    (
        "swiglu-down-width",
        "ops",
        "swiglu",
        [f32(2, 3), f32(3, 4), f32(3, 4), f32(4, 5)],
        {},
        ValueError,
        ["swiglu", "w_down", "(4, 5)", "(4, 3)"],
    ),
    ("rope-theta-inf", "encodings", "rope", [f32(1, 2, 1, 4)], {"theta": float("inf")}, ValueError, ["theta", "inf"]),
    *[
        (f"rope-scaling-{key}", "encodings", "rope", [f32(1, 2, 1, 8)], {"scaling": scaling}, ValueError, ["rope", key])
        for key, scaling in (
            ("factor", {"type": "linear", "factor": 0.0}),
            ("factor", {"type": "dynamic", "factor": float("inf"), "original_max_position_embeddings": 8}),
            (
                "original_max_position_embeddings",
                {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
            ),
            ("beta_fast", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 0.0}),
            ("beta_slow", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_slow": -1.0}),
            (
                "mscale_all_dim",
                {
                    "type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "mscale": 1.0,
                    "mscale_all_dim": -20.0,
                },
            ),
            ("seq_len", {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64, "seq_len": -5}),
            (
                "high_freq_factor",
                {
                    "type": "llama3",
                    "factor": 8.0,
                    "original_max_position_embeddings": 64,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 2.0,
                },
            ),
            (
                "low_freq_factor",
                {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 0.0},
            ),
        )
    ],
]


def _put(backend, value):
    if isinstance(value, tuple):
        dtype, array = value
        return backend.asarray(array, dtype)
    return value


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_clear_error(backend, case):
    _, namespace, name, args, kwargs, exc, words = case
    fn = getattr(getattr(backend, namespace), name)
    kwargs = dict(kwargs)
    positional = [_put(backend, a) for a in args]
    if name == "padding_mask":
        positional.append(3)
        kwargs.pop("t")
    if name in ("sinusoidal", "rope_frequencies"):  # their first arguments are positional-only ints
        positional = [kwargs.pop(k) for k in ("seq_len", "dim") if k in kwargs]
    with pytest.raises(exc) as info:
        fn(*positional, **{k: _put(backend, v) for k, v in kwargs.items()})
    message = str(info.value)
    for word in words:
        assert word in message, f"{name}: message {message!r} should mention {word!r}"
