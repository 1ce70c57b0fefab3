"""Hugging Face state dicts ↔ the spec's params, per family, both ways (NumPy arrays).

HF's ``nn.Linear`` stores (out, in), the spec (in, out) with the heads as their own axes, so a linear
weight is transposed and reshaped (``wq`` (D, N, H) = ``q_proj.weight.T`` reshaped); GPT-2's ``Conv1D``
already stores (in, out). The fused projections are split: GPT-2's ``c_attn`` (D, 3·D) is q, k, v
along its out axis; GPT-NeoX's ``query_key_value`` (N·3·H, D) interleaves them per head, (N, 3, H).
Llama-layout families (llama, qwen2, qwen3, mistral, olmo2, gemma2, gemma3_text; Gemma's
``pre_feedforward_layernorm`` → mlp_norm and its ``post_attention_layernorm`` → post_attn_norm)::

    model.embed_tokens.weight (V, D) → embed          model.norm.weight → norm     lm_head.weight → lm_head (D, V)
    model.layers.{i}.input_layernorm → attn_norm      post_attention_layernorm → mlp_norm (olmo2: post_attn_norm)
    post_feedforward_layernorm (olmo2) → post_mlp_norm
    self_attn.{q,k,v}_proj.weight/bias → w{q,k,v}/b{q,k,v}     self_attn.o_proj → wo, bo
    self_attn.{q,k}_norm.weight → {q,k}_norm          mlp.{gate,up,down}_proj.weight/bias → w_/b_{gate,up,down}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..params import TransformerConfig, param_shapes

State = Mapping[str, np.ndarray]
_LLAMA_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_LLAMA_MLP = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


def _llama_names(config: TransformerConfig) -> dict[str, tuple[str, int | None]]:
    """Our name → (HF name, the linear's in size, or None for a vector)."""
    c = config
    D, NH, F = c.d_model, c.n_heads * c.head_dim, c.d_ff
    post = c.norm_placement in ("post", "sandwich")  # Gemma's post_attention_layernorm is after attention too
    names: dict[str, tuple[str, int | None]] = {"embed": ("model.embed_tokens.weight", None)}
    for i in range(c.n_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        names[p + "attn_norm"] = (hf + "input_layernorm.weight", None)
        names[p + ("post_attn_norm" if post else "mlp_norm")] = (hf + "post_attention_layernorm.weight", None)
        if c.norm_placement == "sandwich":
            names[p + "mlp_norm"] = (hf + "pre_feedforward_layernorm.weight", None)
        names[p + "post_mlp_norm"] = (hf + "post_feedforward_layernorm.weight", None)
        for ours, theirs in _LLAMA_ATTENTION.items():
            names[p + ours] = (hf + f"self_attn.{theirs}.weight", NH if ours == "wo" else D)
            names[p + "b" + ours[1]] = (hf + f"self_attn.{theirs}.bias", None)
        for ours in ("q_norm", "k_norm"):
            names[p + ours] = (hf + f"self_attn.{ours}.weight", None)
        for ours, theirs in _LLAMA_MLP.items():
            names[p + ours] = (hf + f"mlp.{theirs}.weight", F if ours == "w_down" else D)
            names[p + "b" + ours[1:]] = (hf + f"mlp.{theirs}.bias", None)
    names["norm"] = ("model.norm.weight", None)
    names["lm_head"] = ("lm_head.weight", D)
    return names


def to_params(state: State, config: TransformerConfig, kind: str, get: Callable[[str], np.ndarray]) -> dict:
    """The spec's params (unshaped dtype) of ``config`` from an HF state dict of family ``kind``;
    ``get(name)`` reads one HF tensor (raising with the name when absent)."""
    shapes = param_shapes(config)
    if kind == "gpt2":
        return _gpt2_params(config, shapes, get)
    if kind == "gpt_neox":
        return _neox_params(config, shapes, get)
    names = _llama_names(config)
    out = {}
    for ours, shape in shapes.items():
        hf, fan_in = names[ours]
        w = get(hf)
        out[ours] = (w.T if fan_in is not None else w).reshape(shape)
    return out


def to_state(params: Mapping[str, np.ndarray], config: TransformerConfig, kind: str) -> dict[str, np.ndarray]:
    """The HF state dict of family ``kind`` holding ``params`` (the inverse of `to_params`)."""
    if kind == "gpt2":
        return _gpt2_state(params, config)
    if kind == "gpt_neox":
        return _neox_state(params, config)
    names = _llama_names(config)
    out = {}
    for ours, value in params.items():
        hf, fan_in = names[ours]
        flat = value.reshape(-1) if value.ndim == 2 and ours.endswith(("bq", "bk", "bv")) else value  # (N·H,)
        out[hf] = value.reshape(fan_in, -1).T if fan_in is not None else flat
    return out


# -- GPT-2: Conv1D (in, out) weights, one fused c_attn, learned positions, LayerNorms with biases ----


def _gpt2_map(config: TransformerConfig) -> dict[str, str]:
    """Our name → HF name, for every param GPT-2 stores unfused."""
    names = {"embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight"}
    names |= {"norm": "transformer.ln_f.weight", "norm_bias": "transformer.ln_f.bias", "lm_head": "lm_head.weight"}
    for i in range(config.n_layers):
        hf, p = f"transformer.h.{i}.", f"layers.{i}."
        for ours, theirs in {"attn_norm": "ln_1", "mlp_norm": "ln_2"}.items():
            names |= {p + ours: hf + theirs + ".weight", p + ours + "_bias": hf + theirs + ".bias"}
        names |= {p + "wo": hf + "attn.c_proj.weight", p + "bo": hf + "attn.c_proj.bias"}
        names |= {p + "w_in": hf + "mlp.c_fc.weight", p + "b_in": hf + "mlp.c_fc.bias"}
        names |= {p + "w_out": hf + "mlp.c_proj.weight", p + "b_out": hf + "mlp.c_proj.bias"}
    return names


def _gpt2_params(config: TransformerConfig, shapes: Mapping, get: Callable[[str], np.ndarray]) -> dict:
    names = _gpt2_map(config)
    out = {}
    for ours, shape in shapes.items():
        if ours in names:
            w = get(names[ours])
            out[ours] = w.T if ours == "lm_head" else w.reshape(shape)
    D = config.d_model
    for i in range(config.n_layers):
        hf, p = f"transformer.h.{i}.", f"layers.{i}."
        w, b = get(hf + "attn.c_attn.weight"), get(hf + "attn.c_attn.bias")  # (D, 3·D), (3·D,)
        for j, name in enumerate("qkv"):
            out[p + "w" + name] = w[:, j * D : (j + 1) * D].reshape(shapes[p + "w" + name])
            out[p + "b" + name] = b[j * D : (j + 1) * D].reshape(shapes[p + "b" + name])
    return out


def _gpt2_state(params: Mapping[str, np.ndarray], config: TransformerConfig) -> dict[str, np.ndarray]:
    names = _gpt2_map(config)
    D = config.d_model
    out = {}
    for ours, value in params.items():
        if ours in names:
            out[names[ours]] = value.T if ours == "lm_head" else value  # Conv1D: already (in, out)
    for i in range(config.n_layers):
        hf, p = f"transformer.h.{i}.", f"layers.{i}."
        out[hf + "attn.c_proj.weight"] = params[p + "wo"].reshape(-1, D)  # (N·H, D)
        out[hf + "attn.c_attn.weight"] = np.concatenate([params[p + "w" + n].reshape(D, -1) for n in "qkv"], axis=1)
        out[hf + "attn.c_attn.bias"] = np.concatenate([params[p + "b" + n].reshape(-1) for n in "qkv"])
    return out


# -- GPT-NeoX: nn.Linear weights, query_key_value fused per head as (N, 3, H) --------------------------


def _neox_map(config: TransformerConfig) -> dict[str, tuple[str, bool]]:
    """Our name → (HF name, is a linear weight to transpose)."""
    names = {"embed": ("gpt_neox.embed_in.weight", False), "lm_head": ("embed_out.weight", True)}
    names |= {
        "norm": ("gpt_neox.final_layer_norm.weight", False),
        "norm_bias": ("gpt_neox.final_layer_norm.bias", False),
    }
    for i in range(config.n_layers):
        hf, p = f"gpt_neox.layers.{i}.", f"layers.{i}."
        for ours, theirs in {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}.items():
            names |= {p + ours: (hf + theirs + ".weight", False), p + ours + "_bias": (hf + theirs + ".bias", False)}
        names |= {p + "wo": (hf + "attention.dense.weight", True), p + "bo": (hf + "attention.dense.bias", False)}
        names |= {
            p + "w_in": (hf + "mlp.dense_h_to_4h.weight", True),
            p + "b_in": (hf + "mlp.dense_h_to_4h.bias", False),
        }
        names |= {
            p + "w_out": (hf + "mlp.dense_4h_to_h.weight", True),
            p + "b_out": (hf + "mlp.dense_4h_to_h.bias", False),
        }
    return names


def _neox_params(config: TransformerConfig, shapes: Mapping, get: Callable[[str], np.ndarray]) -> dict:
    names = _neox_map(config)
    out = {}
    for ours, shape in shapes.items():
        if ours in names:
            hf, linear = names[ours]
            out[ours] = (get(hf).T if linear else get(hf)).reshape(shape)
    D, N, H = config.d_model, config.n_heads, config.head_dim
    for i in range(config.n_layers):
        hf, p = f"gpt_neox.layers.{i}.attention.query_key_value.", f"layers.{i}."
        w = get(hf + "weight").T.reshape(D, N, 3, H)  # (D, N, 3, H)
        for j, name in enumerate("qkv"):
            out[p + "w" + name] = w[:, :, j, :]
        if config.qkv_bias:
            b = get(hf + "bias").reshape(N, 3, H)  # (N, 3, H)
            for j, name in enumerate("qkv"):
                out[p + "b" + name] = b[:, j, :]
    return out


def _neox_state(params: Mapping[str, np.ndarray], config: TransformerConfig) -> dict[str, np.ndarray]:
    names = _neox_map(config)
    D = config.d_model
    out = {}
    for ours, value in params.items():
        if ours in names:
            hf, linear = names[ours]
            out[hf] = value.reshape(-1, value.shape[-1]).T if linear else value
    for i in range(config.n_layers):
        hf, p = f"gpt_neox.layers.{i}.attention.query_key_value.", f"layers.{i}."
        w = np.stack([params[p + "w" + n] for n in "qkv"], axis=2)  # (D, N, 3, H)
        out[hf + "weight"] = w.reshape(D, -1).T
        if config.qkv_bias:
            out[hf + "bias"] = np.stack([params[p + "b" + n] for n in "qkv"], axis=1).reshape(-1)  # (N·3·H,)
    return out
