"""Every family `load_hf` reads, against ``transformers`` itself: tiny random models of each (made
offline, `tensorglot.checkpoints.parity.tiny_model`), saved with ``save_pretrained`` and loaded here.

Logits equal HF's (float32, rtol 1e-4) on numpy and torch for sequences longer than every window;
greedy decoding with either cache gives HF ``generate``'s tokens; ``save_hf`` writes a directory HF
loads with the same logits; the transformers-4 config layout gives the config the 5 layout gives;
configs that cannot be honoured are refused; torch's and JAX's autograd equal the explicit backward.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import tensorglot
from tensorglot import checkpoints

torch = pytest.importorskip("torch", reason="the family tests build their models with torch")
transformers = pytest.importorskip("transformers", reason="the family tests need transformers")
pytest.importorskip("safetensors", reason="checkpoints are safetensors files")

from tensorglot.checkpoints import parity  # noqa: E402 (after the skips: it needs transformers)

FAMILIES = list(parity.FAMILIES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (HF model, its directory), made once per module."""
    out = {}
    for family in parity.FAMILIES:
        path = tmp_path_factory.mktemp(family.replace("-", "_"))
        model = parity.tiny_model(family)
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


def _loaded(saved, family):
    """(the HF model, our params and config loaded from its directory, the prompt)."""
    model, path = saved[family]
    return (model, *checkpoints.load_hf(path), parity.prompt())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(saved, family, backend):
    model, params, config, tokens = _loaded(saved, family)
    if config.windows:
        assert tokens.shape[1] > max(w for w in config.windows if w), "the sequence must pass the window"
    got = parity.run(backend, params, config, tokens)
    np.testing.assert_allclose(got, parity.hf_logits(model, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("cache", ["contiguous", "paged"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(saved, family, cache, backend):
    model, params, config, tokens = _loaded(saved, family)
    want = parity.hf_generate(model, tokens)
    assert want.shape == (2, parity.SEQ + parity.NEW)
    np.testing.assert_array_equal(parity.run(backend, params, config, tokens, cache), want)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trips_through_transformers(saved, family, tmp_path):
    model, path = saved[family]
    params, config = checkpoints.load_hf(path)
    kind = checkpoints.save_hf(tmp_path, params, config)
    assert kind == json.loads((path / "config.json").read_text())["model_type"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = parity.prompt()
    np.testing.assert_allclose(parity.hf_logits(again, tokens), parity.hf_logits(model, tokens), rtol=1e-5, atol=1e-6)
    params2, config2 = checkpoints.load_hf(tmp_path)
    assert config2 == config and all(np.array_equal(params[k], params2[k]) for k in params)


def _transformers_4_layout(hf: dict) -> dict:
    """The same model's config as transformers 4 wrote it: RoPE at the top level, GPT-NeoX's rotary_pct
    and rotary_emb_base, Qwen's use_sliding_window + max_window_layers instead of layer_types, Gemma 3's
    rope_local_base_freq and sliding_window_pattern."""
    hf = dict(hf)
    rope = dict(hf.pop("rope_parameters", None) or {})
    if hf["model_type"].startswith("gemma"):  # alternating layers, Gemma 3's local θ by its own key
        hf.pop("_sliding_window_pattern", None)
        if hf.pop("layer_types") != ["sliding_attention", "full_attention"]:
            raise AssertionError("the tiny Gemmas alternate sliding and full layers")
        if hf["model_type"] == "gemma3_text":
            hf |= {"sliding_window_pattern": 2, "rope_local_base_freq": rope["sliding_attention"]["rope_theta"]}
            rope = rope["full_attention"]
        hf["rope_theta"] = rope["rope_theta"]
        return hf
    if hf["model_type"] == "gpt_neox":
        hf["rotary_pct"] = rope.pop("partial_rotary_factor")
        hf["rotary_emb_base"] = rope.pop("rope_theta")
    elif rope:
        hf["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        hf["rope_scaling"] = rope
    types = hf.pop("layer_types", None)
    if types and "sliding_attention" in types:
        hf["max_window_layers"] = types.index("sliding_attention")
    return hf


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4_layout_gives_the_same_config(saved, family):
    hf = json.loads((saved[family][1] / "config.json").read_text())
    old = _transformers_4_layout(hf)
    assert old != hf or family in ("gpt2",)
    assert checkpoints.hf_config_to_config(old) == checkpoints.hf_config_to_config(hf)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "bert"}, r"model_type 'bert' is not supported"),
        ({"frobnicate": 3}, r"\['frobnicate'\] are not understood"),
        ({"hidden_act": "gelu_pytorch_tanh"}, r"hidden_act 'gelu_pytorch_tanh' is not supported"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, r"'dynamic' is not"),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}}, r"longrope"),
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, r"partial_rotary_factor"),
    ],
)
def test_a_config_it_cannot_honour_is_refused(saved, change, match):
    hf = json.loads((saved["mistral"][1] / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=match):
        checkpoints.hf_config_to_config(hf)


def test_gpt2_inverse_layer_scaling_is_refused(saved, tmp_path):
    hf = json.loads((saved["gpt2"][1] / "config.json").read_text()) | {"scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        checkpoints.hf_config_to_config(hf)


def test_a_tensor_the_config_has_no_place_for_is_refused(saved, tmp_path):
    """A Qwen 2 checkpoint read as Mistral's (no qkv bias): the biases are left over."""
    from safetensors.numpy import load_file

    _, path = saved["qwen2"]
    state = load_file(path / "model.safetensors")
    _, config = checkpoints.load_hf(path)
    plain = tensorglot.TransformerConfig.from_dict(config.to_dict() | {"qkv_bias": False})
    with pytest.raises(ValueError, match=r"no place for: \['model\.layers\.0\.self_attn\.k_proj\.bias'"):
        checkpoints.hf_state_to_params(state, plain, model_type="qwen2")


def test_save_hf_refuses_an_architecture_no_family_has(tmp_path):
    config = tensorglot.TransformerConfig(
        vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=8, final_softcap=5.0
    )
    with pytest.raises(ValueError, match="no Hugging Face family"):
        checkpoints.save_hf(tmp_path, tensorglot.init_params(config, 0), config)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", [b for b in ("torch", "jax") if b in tensorglot.available_backends()])
@pytest.mark.parametrize("family", FAMILIES)
def test_autograd_equals_the_explicit_backward(saved, family, backend):
    """The framework's autograd through `layers.loss` against the spec's backward written from the
    ``*_backward`` kernels: float64 where the backend has it (JAX only with JAX_ENABLE_X64), else float32."""
    be = tensorglot.get_backend(backend)
    wide = "float64" in be.capabilities
    params, config = checkpoints.load_hf(saved[family][1], dtype="float64" if wide else "float32")
    bp = {k: be.asarray(v) for k, v in params.items()}
    rng = np.random.default_rng(3)
    tok, tgt = (be.asarray(rng.integers(0, config.vocab_size, (2, parity.SEQ))) for _ in range(2))
    layers = be.layers
    value, grads = be.kernels.autograd_value_and_grad(lambda p: layers.loss(tok, tgt, p, config), bp)
    want_value, want = layers.value_and_grad(tok, tgt, bp, config)
    rtol, atol = (1e-9, 1e-12) if wide else (2e-4, 2e-6)
    assert float(value) == pytest.approx(float(want_value), rel=1e-12 if wide else 1e-6)
    for name in params:
        np.testing.assert_allclose(be.to_numpy(grads[name]), be.to_numpy(want[name]), rtol=rtol, atol=atol)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2"])
def test_the_server_engine_serves_a_family_checkpoint_with_transformers_tokens(saved, family):
    """`tensorglot serve --checkpoint` loads through `serving.Model`: any family, the tokens of HF generate."""
    from tensorglot.serving import Model
    from tensorglot.serving.online import Job, OnlineEngine
    from tensorglot.serving.sampling import SamplingParams

    model, path = saved[family]
    tokens = parity.prompt()
    want = parity.hf_generate(model, tokens)[0, parity.SEQ :].tolist()
    engine = OnlineEngine(Model("numpy", checkpoint=str(path)), max_batch=2, block_size=4).start()
    try:
        assert engine.ready.wait(60) and engine.load_error is None, engine.load_error
        got: list[int] = []
        done = threading.Event()
        params = SamplingParams(max_tokens=parity.NEW, temperature=0.0)
        engine.submit(Job(np.asarray(tokens[0]), params, lambda t: got.append(t) or True, lambda *a: done.set()))
        assert done.wait(120), "the engine did not finish"
    finally:
        engine.close()
    assert got == want
