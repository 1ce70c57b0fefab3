"""`tensorglot.checkpoints`: a tiny random `transformers` Llama, built offline, gives the same logits here."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tensorglot
from tensorglot import checkpoints

torch = pytest.importorskip("torch", reason="the checkpoint test builds its model with torch")
transformers = pytest.importorskip("transformers", reason="the checkpoint test needs transformers")
pytest.importorskip("safetensors", reason="checkpoints are safetensors files")


def _tiny_llama(tmp_path, *, tie: bool, rope_scaling=None):
    extra = {} if rope_scaling is None else {"rope_scaling": rope_scaling}
    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones; random ones make the norm mapping observable
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_logits_match_transformers(tmp_path, tie):
    model = _tiny_llama(tmp_path, tie=tie)
    params, config = checkpoints.load_llama(tmp_path)
    assert (config.n_heads, config.n_kv_heads, config.rope_style) == (4, 2, "neox")
    assert config.tie_embeddings is tie and ("lm_head" in params) is not tie
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 11))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    actual = tensorglot.get_backend("numpy").layers.transformer(tokens, params, config)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_llama3_rope_scaling_carries_over(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = _tiny_llama(tmp_path, tie=False, rope_scaling=scaling)
    params, config = checkpoints.load_llama(tmp_path)
    assert config.rope_scaling is not None and config.rope_scaling["type"] == "llama3"
    tokens = np.arange(40).reshape(1, 40) % config.vocab_size  # past the original 16 positions
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    actual = tensorglot.get_backend("numpy").layers.transformer(tokens, params, config)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_interleaved_rope_would_not_match(tmp_path):
    """The convention matters: the same weights read as interleaved RoPE give other logits."""
    model = _tiny_llama(tmp_path, tie=False)
    params, config = checkpoints.load_llama(tmp_path)
    wrong = tensorglot.TransformerConfig.from_dict(config.to_dict() | {"rope_style": "interleaved"})
    tokens = np.arange(9).reshape(1, 9)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    actual = tensorglot.get_backend("numpy").layers.transformer(tokens, params, wrong)
    assert not np.allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_missing_weight_names_the_key(tmp_path):
    _tiny_llama(tmp_path, tie=False)
    from safetensors.numpy import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoints.load_llama(tmp_path)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        checkpoints.load_llama(tmp_path)


def test_rope_parameters_of_transformers_5_are_read():
    hf = json.loads(
        '{"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,'
        ' "intermediate_size": 16, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "linear",'
        ' "factor": 2.0}}'
    )
    config = checkpoints.hf_config_to_config(hf)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"type": "linear", "factor": 2.0}
    assert config.n_kv_heads == 2 and config.head_dim == 4


def test_load_llama_is_load_hf_for_every_family(tmp_path):
    """The first loader's name reads the other families too (`tensorglot serve --checkpoint` calls it)."""
    cfg = transformers.Qwen2Config(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    params, config = checkpoints.load_llama(tmp_path)
    assert config.qkv_bias and not config.o_bias and params["layers.0.bq"].shape == (4, 8)
    assert checkpoints.load_hf(tmp_path)[1] == config
    tokens = np.arange(7).reshape(1, 7)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    actual = tensorglot.get_backend("numpy").layers.transformer(tokens, params, config)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
