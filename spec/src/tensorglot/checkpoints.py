"""Load Hugging Face Llama checkpoints (``config.json`` + ``model.safetensors``) into the spec's params.

`load_llama(dir)` returns ``(params, config)``: NumPy arrays named as in `tensorglot.params` and a
`TransformerConfig`, so any backend runs the model with ``be.layers.transformer(tokens, params, config)``.

The mapping (HF stores a linear layer as ``weight`` of shape (out, in), ours is (in, out))::

    model.embed_tokens.weight                  (V, D)      → embed (V, D)
    model.layers.{i}.input_layernorm.weight    (D,)        → layers.{i}.attn_norm
    model.layers.{i}.self_attn.q_proj.weight   (N·H, D)    → layers.{i}.wq (D, N, H)   = W.T reshaped
    model.layers.{i}.self_attn.k_proj.weight   (K·H, D)    → layers.{i}.wk (D, K, H)   (GQA: K < N)
    model.layers.{i}.self_attn.v_proj.weight   (K·H, D)    → layers.{i}.wv (D, K, H)
    model.layers.{i}.self_attn.o_proj.weight   (D, N·H)    → layers.{i}.wo (N, H, D)   = W.T reshaped
    model.layers.{i}.post_attention_layernorm  (D,)        → layers.{i}.mlp_norm
    model.layers.{i}.mlp.gate_proj/up_proj     (F, D)      → layers.{i}.w_gate / w_up (D, F)
    model.layers.{i}.mlp.down_proj             (D, F)      → layers.{i}.w_down (F, D)
    model.norm.weight                          (D,)        → norm
    lm_head.weight                             (V, D)      → lm_head (D, V); absent when tied

RoPE: HF Llama's ``rotate_half`` pairs feature i with i + H/2 — our ``rope_style="neox"``. The q and k
projections in an HF checkpoint are already in that order (the conversion script from Meta's
interleaved weights permutes them once, ``permute`` in ``convert_llama_weights_to_hf.py``), so no
permutation happens here; `tests/test_checkpoints.py` checks the logits against ``transformers``.
``rope_scaling`` (linear, dynamic, yarn, llama3) carries over with HF's key names.

>>> import tensorglot.checkpoints as ck
>>> ck.hf_config_to_config({"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
...     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
...     "max_position_embeddings": 64, "tie_word_embeddings": True}).rope_style
'neox'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .params import TransformerConfig, check_params

_ACTIVATIONS = {"silu": "swiglu"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")  # a Llama MLP is always gated; hidden_act names the gate's activation


def hf_config_to_config(hf: Mapping[str, Any], /) -> TransformerConfig:
    """A `TransformerConfig` from a Hugging Face ``LlamaConfig`` dict (``config.json``)."""
    fn = "checkpoints.hf_config_to_config"
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{fn}: hidden_act {act!r} is not supported (a Llama MLP uses 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{fn}: attention_bias / mlp_bias are not supported (the spec has no biases)")
    n_heads = int(hf["num_attention_heads"])
    # transformers >= 5 keeps rope_theta and the scaling in one "rope_parameters" dict.
    rope = dict(hf.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or rope or None
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        scaling = None if kind == "default" else {"type": kind, **scaling}
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // n_heads),
        d_ff=int(hf["intermediate_size"]),
        activation=_ACTIVATIONS[act],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_style="neox",
        rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def hf_state_to_params(
    state: Mapping[str, np.ndarray], config: TransformerConfig, /, *, dtype: str | None = None
) -> dict[str, np.ndarray]:
    """The spec's params from a Llama state dict (NumPy arrays, HF names); ``dtype`` casts them."""
    fn = "checkpoints.hf_state_to_params"
    c = config
    D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"{fn}: the checkpoint has no {name!r} (a Llama state dict was expected)")
        return np.asarray(state[name])

    params: dict[str, np.ndarray] = {"embed": get("model.embed_tokens.weight")}
    for i in range(c.n_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        params[p + "attn_norm"] = get(hf + "input_layernorm.weight")
        params[p + "wq"] = get(hf + "self_attn.q_proj.weight").T.reshape(D, N, H)  # (D, N, H)
        params[p + "wk"] = get(hf + "self_attn.k_proj.weight").T.reshape(D, K, H)  # (D, K, H)
        params[p + "wv"] = get(hf + "self_attn.v_proj.weight").T.reshape(D, K, H)  # (D, K, H)
        params[p + "wo"] = get(hf + "self_attn.o_proj.weight").T.reshape(N, H, D)  # (N, H, D)
        params[p + "mlp_norm"] = get(hf + "post_attention_layernorm.weight")
        params[p + "w_gate"] = get(hf + "mlp.gate_proj.weight").T  # (D, F)
        params[p + "w_up"] = get(hf + "mlp.up_proj.weight").T  # (D, F)
        params[p + "w_down"] = get(hf + "mlp.down_proj.weight").T  # (F, D)
    params["norm"] = get("model.norm.weight")
    past = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k)) and int(m.group(1)) >= c.n_layers})
    if past:  # a config that undercounts would silently run a shallower model
        raise ValueError(
            f"{fn}: the checkpoint holds layers {past} past num_hidden_layers = {c.n_layers}; the config and "
            "the weights disagree (no layer is dropped)"
        )
    if not c.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T  # (D, V)
    check_params(fn, {k: v.shape for k, v in params.items()}, c)
    out_dtype = dtype or str(params["embed"].dtype)
    return {k: np.ascontiguousarray(v, dtype=out_dtype) for k, v in params.items()}


def load_llama(
    path: str | os.PathLike[str], /, *, dtype: str | None = "float32"
) -> tuple[dict[str, np.ndarray], TransformerConfig]:
    """``(params, config)`` from a Hugging Face Llama directory: ``config.json`` and ``model.safetensors``
    (or the shards a ``model.safetensors.index.json`` lists). bfloat16 weights are widened to float32
    first (NumPy has no bfloat16); ``dtype`` None keeps the stored dtype.

    Refused with ValueError: weights of layers past ``num_hidden_layers`` (never dropped) and an index
    naming a shard outside ``path``.
    """
    fn = "checkpoints.load_llama"
    root = os.fspath(path)
    config_path = os.path.join(root, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{fn}: {root!r} has no config.json (a Hugging Face model directory was expected)")
    with open(config_path) as fh:
        config = hf_config_to_config(json.load(fh))
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, np.ndarray] = {}
    for name in files:
        file = _inside(fn, root, name)
        if not os.path.isfile(file):
            raise ValueError(f"{fn}: {file!r} is missing")
        state |= _read_safetensors(file)
    return hf_state_to_params(state, config, dtype=dtype), config


def _inside(fn: str, root: str, name: Any) -> str:
    """``root/name``, refused unless the name stays inside ``root`` (no absolute path, no ``..`` out of
    it): an index names files of its own directory. Symlinks are followed as they are (the Hugging Face
    cache links each file to a blob elsewhere)."""
    top = os.path.normpath(os.path.abspath(root))
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ValueError(f"{fn}: the index names shard {name!r}; wanted a file name relative to {root!r}")
    file = os.path.normpath(os.path.join(top, name))
    if os.path.commonpath([top, file]) != top:
        raise ValueError(f"{fn}: the index names shard {name!r}, which lies outside the model directory {root!r}")
    return file


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(file, framework="numpy") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            try:
                out[key] = fh.get_tensor(key)
            except (TypeError, ValueError):  # bfloat16: NumPy has no such dtype; widen the raw bits to float32
                out[key] = _bf16_to_f32(file, key)
    return out


def _bf16_to_f32(file: str, key: str) -> np.ndarray:
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        start, end = header[key]["data_offsets"]
        fh.seek(8 + n + start)
        raw = np.frombuffer(fh.read(end - start), dtype=np.uint16)
    bits = raw.astype(np.uint32) << 16  # bfloat16 is the top half of a float32
    return bits.view(np.float32).reshape(header[key]["shape"])
