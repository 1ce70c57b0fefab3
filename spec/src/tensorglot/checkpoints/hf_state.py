"""Hugging Face state dicts ↔ the spec's params, per family, both ways (NumPy arrays).

Each family is one table, our name → (HF name, how the tensor is laid out), read by `to_params` and
inverted by `to_state`. HF's ``nn.Linear`` stores (out, in), the spec (in, out) with the heads as
their own axes, so a linear weight is transposed and reshaped (``wq`` (D, N, H) = ``q_proj.weight.T``
reshaped); GPT-2's ``Conv1D`` already stores (in, out). The fused projections are split: GPT-2's
``c_attn`` (D, 3·D) holds q, k, v one after the other, (D, 3, N, H); GPT-NeoX's ``query_key_value``
(N·3·H, D) interleaves them per head, (N, 3, H). Llama-layout families (llama, qwen2, qwen3, mistral,
olmo2, gemma2, gemma3_text)::

    model.embed_tokens.weight (V, D) → embed          model.norm.weight → norm     lm_head.weight → lm_head (D, V)
    model.layers.{i}.input_layernorm → attn_norm      post_attention_layernorm → mlp_norm (olmo2, Gemma: post_attn_norm)
    pre_feedforward_layernorm (Gemma) → mlp_norm      post_feedforward_layernorm (olmo2, Gemma) → post_mlp_norm
    self_attn.{q,k,v}_proj.weight/bias → w{q,k,v}/b{q,k,v}     self_attn.o_proj → wo, bo
    self_attn.{q,k}_norm.weight → {q,k}_norm          mlp.{gate,up,down}_proj.weight/bias → w_/b_{gate,up,down}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..params import TransformerConfig, param_shapes

#: Our name → (HF name, the linear's in size or None for a vector or table, whether HF stores it (out, in)).
Table = dict[str, tuple[str, int | None, bool]]
_LLAMA_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_LLAMA_MLP = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
#: Per fused family: (prefix of layer i, the fused linear, its (in, grid) layout, the q/k/v axis of the
#: grid, whether HF stores it (out, in)).
_FUSED = {
    "gpt2": ("transformer.h.{}.attn.c_attn.", 0, False),
    "gpt_neox": ("gpt_neox.layers.{}.attention.query_key_value.", 1, True),
}


def _table(config: TransformerConfig, kind: str) -> Table:
    c = config
    D, NH, F = c.d_model, c.n_heads * c.head_dim, c.d_ff
    head: Table
    if kind == "gpt2":
        head = {"lm_head": ("lm_head.weight", D, True)}
        return _gpt_table(c, "transformer.", "h", ("wte", "wpe", "ln_f"), ("ln_1", "ln_2"), False, D, NH, F) | head
    if kind == "gpt_neox":
        head, top = {"lm_head": ("embed_out.weight", D, True)}, ("embed_in", None, "final_layer_norm")
        norms = ("input_layernorm", "post_attention_layernorm")
        return _gpt_table(c, "gpt_neox.", "layers", top, norms, True, D, NH, F) | head
    post = c.norm_placement in ("post", "sandwich")  # then post_attention_layernorm follows the attention
    names: Table = {"embed": ("model.embed_tokens.weight", None, False)}
    for i in range(c.n_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        names[p + "attn_norm"] = (hf + "input_layernorm.weight", None, False)
        names[p + ("post_attn_norm" if post else "mlp_norm")] = (hf + "post_attention_layernorm.weight", None, False)
        if c.norm_placement == "sandwich":
            names[p + "mlp_norm"] = (hf + "pre_feedforward_layernorm.weight", None, False)
        names[p + "post_mlp_norm"] = (hf + "post_feedforward_layernorm.weight", None, False)
        for ours, theirs in _LLAMA_ATTENTION.items():
            names[p + ours] = (hf + f"self_attn.{theirs}.weight", NH if ours == "wo" else D, True)
            names[p + "b" + ours[1]] = (hf + f"self_attn.{theirs}.bias", None, False)
        for ours in ("q_norm", "k_norm"):
            names[p + ours] = (hf + f"self_attn.{ours}.weight", None, False)
        for ours, theirs in _LLAMA_MLP.items():
            names[p + ours] = (hf + f"mlp.{theirs}.weight", F if ours == "w_down" else D, True)
            names[p + "b" + ours[1:]] = (hf + f"mlp.{theirs}.bias", None, False)
    return names | {"norm": ("model.norm.weight", None, False), "lm_head": ("lm_head.weight", D, True)}


def _gpt_table(
    c: TransformerConfig,
    root: str,
    blocks: str,
    top: tuple[str, str | None, str],
    norms: tuple[str, str],
    linear: bool,
    D: int,
    NH: int,
    F: int,
) -> Table:
    """GPT-2 (Conv1D, ``linear`` False) and GPT-NeoX (nn.Linear): the unfused tensors."""
    embed, positions, final = top
    names: Table = {"embed": (f"{root}{embed}.weight", None, False)}
    if positions:
        names["pos_embed"] = (f"{root}{positions}.weight", None, False)
    names |= {"norm": (f"{root}{final}.weight", None, False), "norm_bias": (f"{root}{final}.bias", None, False)}
    attn, fc, proj = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj") if not linear else (
        "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")  # fmt: skip
    for i in range(c.n_layers):
        hf, p = f"{root}{blocks}.{i}.", f"layers.{i}."
        for ours, theirs in zip(("attn_norm", "mlp_norm"), norms):
            names[p + ours] = (hf + theirs + ".weight", None, False)
            names[p + ours + "_bias"] = (hf + theirs + ".bias", None, False)
        for (w, b), theirs, fan_in in (
            (("wo", "bo"), attn, NH),
            (("w_in", "b_in"), fc, D),
            (("w_out", "b_out"), proj, F),
        ):
            names |= {p + w: (hf + theirs + ".weight", fan_in, linear), p + b: (hf + theirs + ".bias", None, False)}
    return names


def to_params(config: TransformerConfig, kind: str, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """The spec's params of ``config`` (in the stored dtype) from an HF state dict of family ``kind``;
    ``get(name)`` reads one HF tensor (raising with the name when absent)."""
    shapes, table = param_shapes(config), _table(config, kind)
    out = {}
    for ours, shape in shapes.items():
        if ours in table:
            hf, _, transposed = table[ours]
            w = get(hf)
            out[ours] = (w.T if transposed else w).reshape(shape)
    if kind in _FUSED:
        prefix, axis, transposed = _FUSED[kind]
        D, grid = config.d_model, _grid(config, axis)
        for i in range(config.n_layers):
            hf, p = prefix.format(i), f"layers.{i}."
            w = get(hf + "weight")
            w = (w.T if transposed else w).reshape(D, *grid)  # (D, 3, N, H) or (D, N, 3, H)
            b = get(hf + "bias").reshape(grid) if config.qkv_bias else None
            for j, name in enumerate("qkv"):
                out[p + "w" + name] = np.take(w, j, axis=axis + 1)
                if b is not None:
                    out[p + "b" + name] = np.take(b, j, axis=axis)
    return out


def to_state(params: Mapping[str, np.ndarray], config: TransformerConfig, kind: str) -> dict[str, np.ndarray]:
    """The HF state dict of family ``kind`` holding ``params`` (the inverse of `to_params`)."""
    table = _table(config, kind)
    out = {}
    for ours, value in params.items():
        if ours not in table:
            continue
        hf, fan_in, transposed = table[ours]
        if fan_in is not None:
            value = value.reshape(fan_in, -1)  # (in, out)
        elif ours.endswith(("bq", "bk", "bv")):
            value = value.reshape(-1)  # (N·H,)
        out[hf] = value.T if transposed else value
    if kind in _FUSED:
        prefix, axis, transposed = _FUSED[kind]
        for i in range(config.n_layers):
            hf, p = prefix.format(i), f"layers.{i}."
            w = np.stack([params[p + "w" + n] for n in "qkv"], axis=axis + 1).reshape(config.d_model, -1)
            out[hf + "weight"] = w.T if transposed else w
            if config.qkv_bias:
                out[hf + "bias"] = np.stack([params[p + "b" + n] for n in "qkv"], axis=axis).reshape(-1)
    return out


def _grid(config: TransformerConfig, axis: int) -> tuple[int, int, int]:
    """The fused projection's out axis as (3, N, H) (axis 0: q, k, v one after the other) or (N, 3, H)."""
    N, H = config.n_heads, config.head_dim
    return (3, N, H) if axis == 0 else (N, 3, H)
