"""Conformance of the layers namespace: the transformer against the NumPy float64 reference, causality,
greedy generation with and without a cache, the training gradient, and the errors it raises.

Tiny models only (D = 8, two layers), so the whole file runs in seconds on any backend.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from tensorglot import TransformerConfig, init_params
from tensorglot import layers as spec_layers

from ._harness import assert_close

pytestmark = pytest.mark.requires("layers")

#: Three small models that between them cover every option: GQA + swiglu + partial NeoX rotary,
#: MHA + gelu + tied embeddings + interleaved rotary, MQA + relu + llama3 rope scaling.
CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-swiglu-partial-neox": dict(n_kv_heads=2, activation="swiglu", rotary_dim=2, rope_style="neox"),
    "mha-gelu-tied": dict(n_kv_heads=4, activation="gelu", tie_embeddings=True),
    "mqa-relu-llama3": dict(
        n_kv_heads=1,
        activation="relu",
        rope_scaling={"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8},
    ),
    # The architectures of `TransformerConfig` beyond Llama's (GPT-2, GPT-NeoX, OLMo 2, Qwen/Gemma-like).
    "gpt2-layernorm-biases-learned": dict(
        n_kv_heads=4,
        activation="gelu_tanh",
        tie_embeddings=True,
        norm_kind="layer",
        norm_bias=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position="learned",
    ),
    "neox-parallel-partial": dict(
        n_kv_heads=4,
        norm_placement="parallel",
        norm_kind="layer",
        norm_bias=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        rotary_dim=2,
        rope_style="neox",
    ),
    "post-qknorm-projection-window": dict(
        n_kv_heads=2, norm_placement="post", qk_norm="projection", windows=(3, None), rope_style="neox"
    ),
    "sandwich-qknorm-head-softcap": dict(
        n_kv_heads=2,
        norm_placement="sandwich",
        qk_norm="head",
        norm_offset=1.0,
        windows=(None, 2),
        rope_thetas=(10000.0, 100.0),
        attn_scale=0.3,
        final_softcap=3.0,
        embed_scale=2.0,
        qkv_bias=True,
        mlp_bias=True,
    ),
    # Gemma's own kernels: GeGLU and softcapped attention (skipped on a backend without them).
    "gemma-geglu-softcap": dict(
        n_kv_heads=2,
        activation="geglu",
        norm_placement="sandwich",
        norm_offset=1.0,
        qk_norm="head",
        windows=(3, None),
        attn_softcap=2.0,
        final_softcap=3.0,
        embed_scale=2.0,
    ),
}
#: The Llama-shaped ones (a pre-RMSNorm stack whose head a test applies by hand).
LLAMA_CONFIGS = ("gqa-swiglu-partial-neox", "mha-gelu-tied", "mqa-relu-llama3")

#: A two-layer model composes ~25 ops, each rounding its result in the test dtype, where the reference
#: rounds nothing: the logits and gradients get this multiple of the per-op tolerance.
MODEL_SCALE = {"float64": 1.0, "float32": 4.0, "float16": 8.0, "bfloat16": 8.0}


def model_scale(config: TransformerConfig, dtype: str) -> float:
    """`MODEL_SCALE`, ×4 in half precision after a norm (post, sandwich) that divides a sublayer's output
    by its own small RMS: that amplifies the output's rounding, and the gradients' with it."""
    amplified = config.norm_placement in ("post", "sandwich") and dtype in ("float16", "bfloat16")
    return MODEL_SCALE[dtype] * (4.0 if amplified else 1.0)


def tiny_config(name: str = "gqa-swiglu-partial-neox", **overrides: Any) -> TransformerConfig:
    base: dict[str, Any] = dict(vocab_size=13, d_model=8, n_layers=2, n_heads=4, head_dim=4, d_ff=12, max_seq_len=16)
    return TransformerConfig(**(base | CONFIGS[name] | overrides))


def tokens(shape: tuple[int, int], *, seed: int = 0, vocab: int = 13) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def put_params(harness: Any, params: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    return {k: harness.put(v, dtype) for k, v in params.items()}


def ref_params(harness: Any, params: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float64 values the backend holds after rounding to ``dtype``."""
    return {k: harness.rounded(v, dtype) for k, v in params.items()}


def as_ints(backend: Any, x: Any) -> np.ndarray:
    return np.asarray(backend.to_numpy(x)).astype(np.int64)


@pytest.fixture(params=list(CONFIGS))
def config(request: pytest.FixtureRequest, backend: Any) -> TransformerConfig:
    return tiny_config(request.param)


def best_dtype(backend: Any) -> str:
    return "float64" if "float64" in backend.capabilities else "float32"


# -- the namespace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", spec_layers.NAMES)
def test_signature_matches_the_spec(backend, name):
    spec = inspect.signature(getattr(spec_layers.Layers, name))
    spec = spec.replace(parameters=list(spec.parameters.values())[1:])  # drop self
    got = inspect.signature(getattr(backend.layers, name))
    assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
        (p.name, p.kind, p.default) for p in spec.parameters.values()
    ]


# -- forward ---------------------------------------------------------------------------------------


def test_logits_match_the_reference(harness, backend, config, dtype):
    params = init_params(config, 1, dtype="float64")
    tok = tokens((2, 7))
    got = backend.layers.transformer(harness.put(tok, dtype), put_params(harness, params, dtype), config)
    assert backend.dtype_name(got) == dtype
    want = harness.reference.layers.transformer(tok, ref_params(harness, params, dtype), config)
    assert_close(harness.get(got), want, dtype, scale=model_scale(config, dtype), what="transformer logits")


def test_logits_with_positions_match_the_reference(harness, backend):
    config, dtype = tiny_config(), best_dtype(backend)
    params = init_params(config, 2, dtype="float64")
    tok, positions = tokens((2, 3)), np.array([[3, 4, 5], [9, 10, 11]], dtype=np.int32)
    got = backend.layers.transformer(
        harness.put(tok, dtype),
        put_params(harness, params, dtype),
        config,
        positions=harness.put(positions, dtype),
    )
    want = harness.reference.layers.transformer(tok, ref_params(harness, params, dtype), config, positions=positions)
    assert_close(harness.get(got), want, dtype, scale=MODEL_SCALE[dtype], what="transformer logits at positions")


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_blocks_compose_to_the_transformer(harness, backend, name):
    config = tiny_config(name)
    dtype = best_dtype(backend)
    params = init_params(config, 3, dtype="float64")
    bp = put_params(harness, params, dtype)
    tok = tokens((1, 5))
    x = harness.put(params["embed"][tok], dtype)  # (B, S, D)
    layers = backend.layers
    for i in range(config.n_layers):
        x = layers.block(x, bp, config, layer=i)
    ref = harness.reference.layers
    rp = ref_params(harness, params, dtype)
    want = ref.transformer(tok, rp, config)
    head = rp["embed"].T if config.tie_embeddings else rp["lm_head"]
    got = harness.get(backend.ops.rms_norm(x, bp["norm"], eps=config.norm_eps)) @ head
    assert_close(got, want, dtype, scale=MODEL_SCALE[dtype], what="blocks → norm → head")


def test_attention_and_mlp_layers_match_the_reference(harness, backend, dtype):
    config = tiny_config()
    params = init_params(config, 4, dtype="float64")
    x = np.random.default_rng(5).standard_normal((2, 5, config.d_model))
    bp, rp = put_params(harness, params, dtype), ref_params(harness, params, dtype)
    ref = harness.reference.layers
    for name in ("attention_layer", "mlp_layer"):
        got = getattr(backend.layers, name)(harness.put(x, dtype), bp, config, layer=1)
        want = getattr(ref, name)(harness.rounded(x, dtype), rp, config, layer=1)
        assert_close(harness.get(got), want, dtype, scale=MODEL_SCALE[dtype], what=name)


def test_output_at_t_ignores_later_tokens(harness, backend, config):
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 5, dtype="float64"), dtype)
    a, b = tokens((2, 8), seed=1), tokens((2, 8), seed=2)
    t = 4
    b[:, :t] = a[:, :t]  # same prefix, different futures
    la = harness.get(backend.layers.transformer(harness.put(a, dtype), params, config))
    lb = harness.get(backend.layers.transformer(harness.put(b, dtype), params, config))
    assert_close(lb[:, :t], la[:, :t], dtype, what="logits before t")
    assert not np.allclose(lb[:, t:], la[:, t:]), "the later tokens should change the later logits"


# -- generate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_generate_with_a_cache_gives_the_tokens_of_recomputation(harness, backend, config, cache):
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 6, dtype="float64"), dtype)
    prompt = harness.put(tokens((2, 4), seed=3), dtype)
    cached = as_ints(backend, backend.layers.generate(params, config, prompt, max_new_tokens=6, cache=cache))
    recomputed = as_ints(backend, backend.layers.generate(params, config, prompt, max_new_tokens=6, cache=None))
    assert cached.shape == (2, 10)
    np.testing.assert_array_equal(cached[:, :4], tokens((2, 4), seed=3))
    np.testing.assert_array_equal(cached, recomputed)


@pytest.mark.requires("float64")
def test_generate_matches_the_reference(harness, backend, config):
    params = init_params(config, 7, dtype="float64")
    prompt = tokens((2, 3), seed=4)
    got = backend.layers.generate(
        put_params(harness, params, "float64"), config, harness.put(prompt, "float64"), max_new_tokens=5
    )
    want = harness.reference.layers.generate(params, config, prompt, max_new_tokens=5, cache=None)
    np.testing.assert_array_equal(as_ints(backend, got), want)


def test_generate_is_greedy(harness, backend):
    config, dtype = tiny_config(), best_dtype(backend)
    params = put_params(harness, init_params(config, 8, dtype="float64"), dtype)
    prompt = tokens((1, 3), seed=5)
    out = as_ints(backend, backend.layers.generate(params, config, harness.put(prompt, dtype), max_new_tokens=3))
    for t in range(3, 6):
        logits = harness.get(
            backend.layers.transformer(harness.put(out[:, :t].astype(np.int32), dtype), params, config)
        )
        assert out[0, t] == int(np.argmax(logits[0, -1]))


def test_generate_with_no_new_tokens_returns_the_prompt(harness, backend):
    config, dtype = tiny_config(), best_dtype(backend)
    params = put_params(harness, init_params(config, 8, dtype="float64"), dtype)
    prompt = tokens((2, 3))
    out = backend.layers.generate(params, config, harness.put(prompt, dtype), max_new_tokens=0)
    np.testing.assert_array_equal(as_ints(backend, out), prompt)


# -- the gradient ----------------------------------------------------------------------------------


def reference_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]
    return float((lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]).mean())


def test_loss_and_gradients_match_the_reference(harness, backend, config, dtype):
    params = init_params(config, 9, dtype="float64")
    tok, tgt = tokens((2, 6), seed=6), tokens((2, 6), seed=7)
    loss, grads = backend.layers.value_and_grad(
        harness.put(tok, dtype), harness.put(tgt, dtype), put_params(harness, params, dtype), config
    )
    ref_loss, ref_grads = harness.reference.layers.value_and_grad(tok, tgt, ref_params(harness, params, dtype), config)
    assert_close(harness.get(loss), ref_loss, dtype, scale=model_scale(config, dtype), what="loss")
    assert sorted(grads) == sorted(params)
    for name in params:
        assert backend.dtype_name(grads[name]) == dtype, name
        scale = model_scale(config, dtype)
        assert_close(harness.get(grads[name]), ref_grads[name], dtype, scale=scale, what=f"d{name}")


@pytest.mark.requires("float64")
def test_gradient_matches_central_differences(harness, backend, config):
    params = init_params(config, 10, dtype="float64")
    tok, tgt = tokens((2, 5), seed=8), tokens((2, 5), seed=9)
    bt, btg = harness.put(tok, "float64"), harness.put(tgt, "float64")
    loss, grads = backend.layers.value_and_grad(bt, btg, put_params(harness, params, "float64"), config)
    assert float(harness.get(loss)) == pytest.approx(
        reference_loss(harness.reference.layers.transformer(tok, params, config), tgt), rel=1e-12
    )
    rng = np.random.default_rng(11)
    eps = 1e-6

    def loss_at(p: dict[str, np.ndarray]) -> float:
        return reference_loss(
            harness.get(backend.layers.transformer(bt, put_params(harness, p, "float64"), config)), tgt
        )

    for name, value in params.items():
        # Three entries of every parameter (all of them would be ~1600 forward passes per model).
        for flat in rng.choice(value.size, size=min(3, value.size), replace=False):
            idx = np.unravel_index(flat, value.shape)
            orig = value[idx]
            value[idx] = orig + eps
            up = loss_at(params)
            value[idx] = orig - eps
            down = loss_at(params)
            value[idx] = orig
            numeric = (up - down) / (2 * eps)
            # Central differences in float64 are good to ~eps² + rounding/eps ≈ 1e-9 here.
            assert abs(harness.get(grads[name])[idx] - numeric) <= 1e-7 + 1e-6 * abs(numeric), (name, idx)


def test_loss_is_the_value_of_value_and_grad(harness, backend, config, dtype):
    params = put_params(harness, init_params(config, 11, dtype="float64"), dtype)
    tok, tgt = harness.put(tokens((2, 6), seed=10), dtype), harness.put(tokens((2, 6), seed=11), dtype)
    loss = backend.layers.loss(tok, tgt, params, config)
    assert backend.dtype_name(loss) == dtype and tuple(loss.shape) == ()
    value, _ = backend.layers.value_and_grad(tok, tgt, params, config)
    np.testing.assert_array_equal(harness.get(loss), harness.get(value))


@pytest.mark.requires("grad")
def test_autograd_of_the_loss_equals_the_explicit_backward(harness, backend, config):
    """The backend's own autograd through `loss` (the transformer and the cross-entropy kernels) against
    the spec's backward pass written from the ``*_backward`` kernels."""
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 12, dtype="float64"), dtype)
    tok, tgt = harness.put(tokens((2, 6), seed=12), dtype), harness.put(tokens((2, 6), seed=13), dtype)
    layers = backend.layers
    value, grads = backend.kernels.autograd_value_and_grad(lambda p: layers.loss(tok, tgt, p, config), params)
    want_value, want = layers.value_and_grad(tok, tgt, params, config)
    assert_close(harness.get(value), harness.get(want_value), dtype, what="loss")
    assert sorted(grads) == sorted(params)
    for name in params:
        scale = model_scale(config, dtype)
        assert_close(harness.get(grads[name]), harness.get(want[name]), dtype, scale=scale, what=name)


# -- a backend's overrides -------------------------------------------------------------------------


def overrides(backend: Any) -> list[str]:
    """The public methods of the backend's `Layers` subclass that replace the spec's."""
    if not isinstance(backend.layers, spec_layers.Layers):
        return []
    return [n for n in spec_layers.NAMES if getattr(type(backend.layers), n) is not getattr(spec_layers.Layers, n)]


#: The overrides the suite knows how to hold to the spec; any other fails `test_every_override_is_checked`.
#: One model suffices: an override runs the same code for every config, which the other tests cover.
CHECKED_OVERRIDES = ("transformer", "generate")


def test_every_override_is_checked(backend):
    unchecked = sorted(set(overrides(backend)) - set(CHECKED_OVERRIDES))
    assert not unchecked, f"{backend.name} overrides {unchecked}, which the suite does not compare with the spec"


def spec_method(backend: Any, name: str) -> Any:
    if name not in overrides(backend):
        pytest.skip(f"backend {backend.name!r} does not override Layers.{name}")
    return getattr(spec_layers.Layers, name).__get__(backend.layers)


@pytest.mark.parametrize("cache", ["contiguous", "paged", None])
def test_an_overridden_generate_gives_the_spec_tokens(harness, backend, cache):
    spec_generate = spec_method(backend, "generate")
    config, dtype = tiny_config(), best_dtype(backend)
    params = put_params(harness, init_params(config, 13, dtype="float64"), dtype)
    prompt = harness.put(tokens((3, 4), seed=14), dtype)
    got = backend.layers.generate(params, config, prompt, max_new_tokens=5, cache=cache)
    want = spec_generate(params, config, prompt, max_new_tokens=5, cache=cache)
    assert backend.dtype_name(got) == backend.dtype_name(want)
    np.testing.assert_array_equal(as_ints(backend, got), as_ints(backend, want))


@pytest.mark.parametrize("kind", ["contiguous", "paged", None])
def test_an_overridden_transformer_gives_the_spec_logits(harness, backend, kind):
    spec_transformer = spec_method(backend, "transformer")
    config, dtype = tiny_config(), best_dtype(backend)
    params = put_params(harness, init_params(config, 14, dtype="float64"), dtype)
    tok = tokens((2, 7), seed=15)
    caches = [None if kind is None else backend.layers.kv_cache(config, 2, 8, kind=kind, dtype=dtype) for _ in "ab"]
    for lo, hi in ((0, 5), (5, 6), (6, 7)) if kind else ((0, 7),):
        step = harness.put(tok[:, lo:hi], dtype)
        got = backend.layers.transformer(step, params, config, cache=caches[0])
        want = spec_transformer(step, params, config, cache=caches[1])
        assert_close(harness.get(got), harness.get(want), dtype, scale=MODEL_SCALE[dtype], what=f"logits {lo}:{hi}")
    assert [[7, 7] if c is None else c.lengths().tolist() for c in caches] == [[7, 7]] * 2


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(activation="tanh"), "activation"),
        (dict(rotary_dim=3), "rotary_dim"),
        (dict(rotary_dim=6), "rotary_dim"),
        (dict(d_model=0), "d_model"),
        (dict(rope_style="sideways"), "rope_style"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_scaling={"type": "linear"}), "factor"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_non_int_config_field_raises():
    with pytest.raises(TypeError, match="n_layers"):
        tiny_config(n_layers=2.0)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.array([[1, 13]], dtype=np.int32), r"vocab_size\) = \[0, 13\)"),
        (np.array([[-1, 2]], dtype=np.int32), "vocab_size"),
        (np.zeros((1, 17), dtype=np.int32), "max_seq_len = 16"),
        (np.zeros((3,), dtype=np.int32), r"\(B, S\)"),
    ],
)
def test_bad_tokens_raise(harness, backend, bad, match):
    config = tiny_config()
    params = put_params(harness, init_params(config, 0, dtype="float64"), "float32")
    with pytest.raises(ValueError, match=match):
        backend.layers.transformer(harness.put(bad, "float32"), params, config)


def test_float_tokens_raise(harness, backend):
    config = tiny_config()
    params = put_params(harness, init_params(config, 0, dtype="float64"), "float32")
    with pytest.raises(TypeError, match="tokens"):
        backend.layers.transformer(backend.asarray(np.zeros((1, 2)), "float32"), params, config)


def test_generate_past_max_seq_len_raises(harness, backend):
    config = tiny_config()
    params = put_params(harness, init_params(config, 0, dtype="float64"), "float32")
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.layers.generate(params, config, harness.put(tokens((1, 10)), "float32"), max_new_tokens=7)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_params_that_do_not_match_the_config_raise(harness, backend, problem):
    config = tiny_config()
    params = init_params(config, 0, dtype="float64")
    if problem == "missing":
        del params["layers.1.wk"]
    elif problem == "extra":
        params["layers.1.bias"] = np.zeros(8)
    else:
        params["layers.0.wq"] = np.zeros((8, 2, 8))
    with pytest.raises(ValueError, match=r"layers\.(1\.wk|1\.bias|0\.wq)"):
        backend.layers.transformer(
            harness.put(tokens((1, 3)), "float32"), put_params(harness, params, "float32"), config
        )
