"""TransformerConfig, init_params and the checkpoint formats (the spec's params module, on NumPy)."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import pytest

from tensorglot import TransformerConfig, init_params
from tensorglot.params import load_params, param_shapes, save_params


def config(**overrides):
    base = dict(vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=8)
    return TransformerConfig(**(base | overrides))


def test_same_seed_same_arrays_and_the_stream_is_pinned():
    a, b = init_params(config(), 0, dtype="float64"), init_params(config(), 0, dtype="float64")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # PCG64(0)'s first standard normals / √D: identical on every machine and NumPy version.
    np.testing.assert_allclose(a["embed"][0], [0.06286511, -0.06605243, 0.32021133, 0.05245006], atol=1e-8)
    rng = np.random.Generator(np.random.PCG64(0))
    np.testing.assert_array_equal(a["embed"], rng.standard_normal((8, 4)) / 2.0)


def test_float32_params_are_the_float64_ones_rounded():
    hi, lo = init_params(config(), 3, dtype="float64"), init_params(config(), 3)
    assert all(lo[k].dtype == np.float32 and np.array_equal(lo[k], hi[k].astype(np.float32)) for k in hi)


def test_different_seeds_differ():
    assert not np.array_equal(init_params(config(), 0)["embed"], init_params(config(), 1)["embed"])


def test_names_and_shapes_cover_gqa_swiglu_and_tied_embeddings():
    c = config(
        vocab_size=10,
        d_model=6,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=3 * 2,
        d_ff=5,
        tie_embeddings=True,
    )
    params = init_params(c, 0)
    assert "lm_head" not in params
    assert params["layers.1.wq"].shape == (6, 4, 6)
    assert params["layers.1.wk"].shape == params["layers.1.wv"].shape == (6, 2, 6)
    assert params["layers.1.wo"].shape == (4, 6, 6)
    assert params["layers.0.w_gate"].shape == params["layers.0.w_up"].shape == (6, 5)
    assert params["layers.0.w_down"].shape == (5, 6)
    assert {k: v.shape for k, v in params.items()} == param_shapes(c)
    relu = init_params(config(activation="relu"), 0)
    assert relu["layers.0.w_in"].shape == (4, 8) and relu["layers.0.w_out"].shape == (8, 4)
    assert relu["lm_head"].shape == (4, 8)


def test_init_is_scaled_normal():
    c = config(d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=512, activation="relu")
    p = init_params(c, 0, dtype="float64")
    assert p["layers.0.wq"].std() == pytest.approx(1 / math.sqrt(256), rel=0.02)
    assert p["layers.0.wo"].std() == pytest.approx(1 / math.sqrt(256) / math.sqrt(16), rel=0.02)
    assert p["layers.0.w_out"].std() == pytest.approx(1 / math.sqrt(512) / math.sqrt(16), rel=0.02)
    assert (p["layers.3.attn_norm"] == 1).all() and (p["norm"] == 1).all()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load_round_trip_without_pickle(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed")
    c = config(n_heads=2, n_kv_heads=1, head_dim=2, rope_scaling={"type": "linear", "factor": 2.0})
    params = init_params(c, 5)
    path = tmp_path / f"model{suffix}"
    save_params(path, params, config=c)
    loaded, loaded_config = load_params(path)
    assert loaded_config == c
    assert sorted(loaded) == sorted(params)
    assert all(loaded[k].dtype == params[k].dtype and np.array_equal(loaded[k], params[k]) for k in params)
    save_params(path, params)
    assert load_params(path)[1] is None


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, embed=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_params(path)


def test_unknown_checkpoint_suffix_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        save_params(tmp_path / "model.pt", {})


def test_config_round_trips_through_a_dict_and_is_hashable():
    c = config(rope_scaling={"type": "linear", "factor": 2.0})
    assert TransformerConfig.from_dict(c.to_dict()) == c
    assert hash(c) == hash(TransformerConfig.from_dict(c.to_dict()))
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerConfig.from_dict(c.to_dict() | {"dropout": 0.1})


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(tie_embeddings=1), TypeError, "tie_embeddings"),
        (dict(vocab_size=-1), ValueError, "vocab_size"),
        (dict(max_seq_len=0), ValueError, "max_seq_len"),
        (dict(rope_theta=-1.0), ValueError, "rope_theta"),
    ],
)
def test_bad_config_fields_raise(overrides, error, match):
    with pytest.raises(error, match=match):
        config(**overrides)


def test_init_params_validates_its_arguments():
    with pytest.raises(TypeError, match="TransformerConfig"):
        init_params(cast(Any, {"vocab_size": 8}), 0)
    with pytest.raises(ValueError, match="seed"):
        init_params(config(), -1)
    with pytest.raises(ValueError, match="dtype"):
        init_params(config(), 0, dtype="int8")
