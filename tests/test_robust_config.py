"""Issue 14: a frozen config stays frozen (``rope_scaling`` is immutable and hashable), and still
round-trips through pickle and JSON and works as a jit key."""

from __future__ import annotations

import json
import pickle

import pytest

import tensorglot
from tensorglot.params import RopeScaling

SCALING = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def _config(**kw):
    base = dict(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, max_seq_len=32)
    return tensorglot.TransformerConfig(**(base | kw))


def test_rope_scaling_cannot_change_under_a_hashed_config():
    source = dict(SCALING)
    config = _config(rope_scaling=source)
    key = hash(config)
    with pytest.raises(TypeError):
        config.rope_scaling["factor"] = 8.0  # type: ignore[index]
    source["factor"] = 8.0  # the caller's dict is not the config's
    assert config.rope_scaling["factor"] == 4.0 and hash(config) == key
    assert isinstance(config.rope_scaling, RopeScaling) and config.rope_scaling == SCALING


def test_a_dict_and_its_frozen_form_give_equal_configs():
    a, b = _config(rope_scaling=SCALING), _config(rope_scaling=RopeScaling(SCALING))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


def test_config_round_trips_through_pickle_json_and_a_jit_key():
    config = _config(rope_scaling=SCALING)
    assert pickle.loads(pickle.dumps(config)) == config
    data = json.loads(json.dumps(config.to_dict()))
    assert data["rope_scaling"] == SCALING and tensorglot.TransformerConfig.from_dict(data) == config
    jax = pytest.importorskip("jax", reason="the jit key needs jax")
    calls = []

    def f(x, config):
        calls.append(config)
        return x * config.rope_scaling["factor"]

    jitted = jax.jit(f, static_argnames="config")
    assert float(jitted(1.0, config=config)) == 4.0
    assert float(jitted(2.0, config=_config(rope_scaling=dict(SCALING)))) == 8.0
    assert len(calls) == 1  # an equal config is the same key: traced once


def test_unhashable_scaling_values_are_refused():
    with pytest.raises((TypeError, ValueError), match="TransformerConfig"):
        _config(rope_scaling={"type": "linear", "factor": [2.0]})


def test_numpy_scalars_in_a_config_are_the_numbers_they_hold():
    import numpy as np

    config = _config(vocab_size=np.int64(16), norm_eps=np.float32(1e-5), rope_theta=np.float64(500.0))
    assert type(config.vocab_size) is int and type(config.norm_eps) is float
    assert config == _config(norm_eps=float(np.float32(1e-5)), rope_theta=500.0)
    assert json.loads(json.dumps(config.to_dict()))["vocab_size"] == 16
