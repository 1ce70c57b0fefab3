"""Issue 14: loading and saving refuse what they cannot honour — a checkpoint with more layers than its
config, an index naming files outside its directory, parameters that would be pickled."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tensorglot
from tensorglot import checkpoints
from tensorglot.params import load_params, save_params

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="checkpoints are safetensors files")

HF = {
    "vocab_size": 11,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 12,
    "max_position_embeddings": 32,
    "tie_word_embeddings": True,
}


def _state(layers: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    V, D, N, K, H, F = 11, 8, 2, 1, 4, 12
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _write(directory, state, hf=HF, index=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    if index is None:
        safetensors_numpy.save_file(state, str(directory / "model.safetensors"))
    else:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return directory


def test_a_checkpoint_loads(tmp_path):
    params, config = checkpoints.load_llama(_write(tmp_path / "m", _state(1)))
    assert config.n_layers == 1 and params["layers.0.wq"].shape == (8, 2, 4)


def test_layers_past_num_hidden_layers_are_refused_not_dropped(tmp_path):
    with pytest.raises(
        ValueError, match=r"hf_state_to_params: the checkpoint holds layers \[1, 2\] past num_hidden_layers = 1"
    ):
        checkpoints.load_llama(_write(tmp_path / "m", _state(3)))


@pytest.mark.parametrize("where", ["../outside/model.safetensors", "ABSOLUTE", "sub/../../outside/model.safetensors"])
def test_an_index_naming_a_shard_outside_the_directory_is_refused(tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    safetensors_numpy.save_file(_state(1), str(outside / "model.safetensors"))  # a readable file is there
    name = str(outside / "model.safetensors") if where == "ABSOLUTE" else where
    keys = dict.fromkeys(_state(1), name)
    model = _write(tmp_path / "model", None, index=keys)
    with pytest.raises(ValueError, match=r"load_(hf|llama): the index names shard") as info:
        checkpoints.load_llama(model)
    assert name in str(info.value)


def test_a_shard_in_a_subdirectory_still_loads(tmp_path):
    model = tmp_path / "model"
    (model / "shards").mkdir(parents=True)
    safetensors_numpy.save_file(_state(1), str(model / "shards" / "a.safetensors"))
    _write(model, None, index=dict.fromkeys(_state(1), "shards/a.safetensors"))
    params, _ = checkpoints.load_llama(model)
    assert "layers.0.w_gate" in params


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_params_refuses_what_would_be_pickled(tmp_path, suffix):
    config = tensorglot.TransformerConfig(
        vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=8
    )
    params = tensorglot.init_params(config, 0)
    bad = dict(params, norm=np.array([object(), 1, 2, 3], dtype=object))
    path = tmp_path / f"p{suffix}"
    with pytest.raises(TypeError, match=r"save_params: params\['norm'\] has dtype object"):
        save_params(path, bad, config=config)
    assert not path.exists()
    save_params(path, params, config=config)
    loaded, again = load_params(path)
    assert again == config and all(np.array_equal(loaded[k], params[k]) for k in params)
