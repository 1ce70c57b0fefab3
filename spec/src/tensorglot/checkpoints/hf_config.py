"""Hugging Face ``config.json`` → `TransformerConfig`, per ``model_type``, and back (for `save_hf`).

Both config layouts are read: transformers 5 (``rope_parameters``, ``layer_types``) and transformers 4
(``rope_theta``/``rope_scaling`` at the top level, ``rotary_pct``/``rotary_emb_base``,
``use_sliding_window``/``max_window_layers``). Every key of a config is either read, known to change
nothing the forward pass computes (token ids, dropout, initialisation: `_HARMLESS`), or refused: a key
whose value this version cannot honour raises ValueError naming it, never a silent approximation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..params import TransformerConfig

#: The families `load_hf` reads, by Hugging Face ``model_type``.
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "olmo2", "gpt2", "gpt_neox", "gemma2", "gemma3_text")

#: Keys that change nothing in a forward pass (dropout is off at inference and absent here).
_HARMLESS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "attention_dropout",
    "hidden_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop", "classifier_dropout", "is_decoder",
    "add_cross_attention", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
    "summary_type", "summary_use_proj", "output_attentions", "output_hidden_states", "return_dict",
    "tie_encoder_decoder", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "reorder_and_upcast_attn", "pretraining_tp", "layer_norm_eps_mode", "cache_implementation",
}  # fmt: skip
#: Keys each family reads.
_READ_COMMON = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "hidden_act", "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
    "rope_theta", "rope_scaling",
}  # fmt: skip
_READ = {
    "llama": {"rms_norm_eps", "attention_bias", "mlp_bias"},
    "qwen2": {"rms_norm_eps", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "qwen3": {"rms_norm_eps", "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers",
              "layer_types"},
    "mistral": {"rms_norm_eps", "sliding_window"},
    "olmo2": {"rms_norm_eps", "attention_bias"},
    "gpt2": {"n_embd", "n_layer", "n_head", "n_inner", "n_positions", "activation_function", "layer_norm_epsilon",
             "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "n_ctx"},
    "gemma2": {"rms_norm_eps", "attention_bias", "hidden_activation", "query_pre_attn_scalar", "sliding_window",
               "layer_types", "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"},
    "gemma3_text": {"rms_norm_eps", "attention_bias", "hidden_activation", "query_pre_attn_scalar", "sliding_window",
                    "layer_types", "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
                    "sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq"},
    "gpt_neox": {"layer_norm_eps", "use_parallel_residual", "attention_bias", "rotary_pct", "rotary_emb_base",
                 "partial_rotary_factor"},
}  # fmt: skip
#: Hugging Face activations → the spec's (``hidden_act`` / ``activation_function``).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}


def model_type(hf: Mapping[str, Any], fn: str) -> str:
    kind = hf.get("model_type", "llama")  # a config without one was a Llama (the first loader's only family)
    if kind not in MODEL_TYPES:
        raise ValueError(f"{fn}: model_type {kind!r} is not supported, wanted one of {', '.join(MODEL_TYPES)}")
    return kind


def config_from_hf(hf: Mapping[str, Any], /, fn: str = "checkpoints.hf_config_to_config") -> TransformerConfig:
    """A `TransformerConfig` from a Hugging Face config dict of any family in `MODEL_TYPES`."""
    kind = model_type(hf, fn)
    unknown = sorted(set(hf) - _HARMLESS - _READ_COMMON - _READ[kind])
    if unknown:
        raise ValueError(f"{fn}: {kind} config keys {unknown} are not understood (refused rather than ignored)")

    def need(key: str, want: Any) -> None:
        if key in hf and hf[key] != want:
            raise ValueError(f"{fn}: {kind} config {key} = {hf[key]!r} is not supported (only {want!r})")

    if kind == "gpt2":
        need("scale_attn_by_inverse_layer_idx", False)
        need("scale_attn_weights", True)
        D = int(hf["n_embd"])
        return TransformerConfig(
            vocab_size=int(hf["vocab_size"]), d_model=D, n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
            n_kv_heads=int(hf["n_head"]), head_dim=D // int(hf["n_head"]), d_ff=int(hf.get("n_inner") or 4 * D),
            activation=_activation(hf.get("activation_function", "gelu_new"), fn), norm_kind="layer",
            norm_bias=True, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), qkv_bias=True, o_bias=True,
            mlp_bias=True, position="learned", max_seq_len=int(hf.get("n_positions", 1024)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )  # fmt: skip
    N = int(hf["num_attention_heads"])
    H = int(hf.get("head_dim") or int(hf["hidden_size"]) // N)
    if kind.startswith("gemma"):
        return _gemma(hf, kind, N, H, fn)
    theta, scaling, partial = _rope(hf, kind, fn)
    act = _activation(hf.get("hidden_act", "silu"), fn)
    fields: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
        n_heads=N, n_kv_heads=int(hf.get("num_key_value_heads") or N), head_dim=H,
        d_ff=int(hf["intermediate_size"]), rope_theta=theta, rope_style="neox", rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )  # fmt: skip
    if kind == "gpt_neox":
        r = int(H * partial)
        if r % 2:
            raise ValueError(f"{fn}: gpt_neox rotary dims head_dim × rotary_pct = {r} must be even")
        bias = bool(hf.get("attention_bias", True))
        return TransformerConfig(
            **fields, activation=act, norm_kind="layer", norm_bias=True,
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)), qkv_bias=bias, o_bias=bias, mlp_bias=True,
            rotary_dim=None if r == H else r,
            norm_placement="parallel" if hf.get("use_parallel_residual", True) else "pre",
        )  # fmt: skip
    if partial != 1.0:
        raise ValueError(f"{fn}: {kind} with partial_rotary_factor = {partial} is not supported")
    if act != "silu":
        raise ValueError(f"{fn}: {kind} hidden_act {hf['hidden_act']!r} is not supported (a gated MLP needs 'silu')")
    bias = bool(hf.get("attention_bias", False))
    fields |= dict(activation="swiglu", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), windows=_windows(hf, kind, fn))
    if kind == "llama":
        return TransformerConfig(**fields, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if kind == "qwen2":
        return TransformerConfig(**fields, qkv_bias=True)
    if kind == "qwen3":
        return TransformerConfig(**fields, qkv_bias=bias, o_bias=bias, qk_norm="head")
    if kind == "olmo2":
        return TransformerConfig(**fields, qkv_bias=bias, o_bias=bias, qk_norm="projection", norm_placement="post")
    return TransformerConfig(**fields)  # mistral


def _gemma(hf: Mapping[str, Any], kind: str, N: int, H: int, fn: str) -> TransformerConfig:
    """Gemma 2 and 3: sandwich norms with weight 1 + w, embeddings × √D, GeGLU, a scale from
    query_pre_attn_scalar, sliding windows by layer type; Gemma 2 softcaps, Gemma 3 QK-norm and a local θ."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{fn}: {kind} use_bidirectional_attention is not supported (a decoder is causal)")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{fn}: {kind} hidden_activation {act!r} is not supported (only 'gelu_pytorch_tanh')")
    L, D = int(hf["num_hidden_layers"]), int(hf["hidden_size"])
    pattern = 2 if kind == "gemma2" else int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    if len(types) != L or set(types) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"{fn}: layer_types must name full_attention or sliding_attention for {L} layers")
    W = hf.get("sliding_window")
    windows = tuple(int(W) if t == "sliding_attention" and W is not None else None for t in types)
    rope = dict(hf.get("rope_parameters") or {})
    if kind == "gemma3_text":  # one RoPE per layer type (transformers 5), or rope_local_base_freq (4)
        full = dict(
            rope.get("full_attention") or {"rope_theta": hf.get("rope_theta", 1e6)} | (hf.get("rope_scaling") or {})
        )
        local = dict(rope.get("sliding_attention") or {"rope_theta": hf.get("rope_local_base_freq", 1e4)})
        theta, scaling, _ = _rope({"rope_parameters": full}, kind, fn)
        local_theta, local_scaling, _ = _rope({"rope_parameters": local}, kind, fn)
        if scaling != local_scaling:
            raise ValueError(f"{fn}: {kind} with RoPE scaling on only some layers is not supported")
        thetas = tuple(local_theta if t == "sliding_attention" else theta for t in types)
    else:
        theta, scaling, _ = _rope(hf, kind, fn)
        thetas = None
    uniform = thetas is None or len(set(thetas)) == 1
    theta = theta if thetas is None else thetas[0] if uniform else theta
    bias = bool(hf.get("attention_bias", False))
    softcap = (hf.get("attn_logit_softcapping"), hf.get("final_logit_softcapping"))
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]), d_model=D, n_layers=L, n_heads=N,
        n_kv_heads=int(hf.get("num_key_value_heads") or N), head_dim=H, d_ff=int(hf["intermediate_size"]),
        activation="geglu", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_style="neox",
        rope_scaling=scaling, max_seq_len=int(hf.get("max_position_embeddings", 8192)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), norm_placement="sandwich", norm_offset=1.0,
        qkv_bias=bias, o_bias=bias, qk_norm="head" if kind == "gemma3_text" else None,
        windows=windows if any(windows) else None, rope_thetas=None if uniform else thetas,
        attn_scale=float(hf.get("query_pre_attn_scalar", H)) ** -0.5, attn_softcap=softcap[0], final_softcap=softcap[1],
        embed_scale=D**0.5,
    )  # fmt: skip


def _activation(name: str, fn: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{fn}: activation {name!r} is not supported, wanted one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope(hf: Mapping[str, Any], kind: str, fn: str) -> tuple[float, dict[str, Any] | None, float]:
    """(θ, scaling or None, partial rotary factor) from either layout."""
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5
    legacy = dict(hf.get("rope_scaling") or {})  # transformers 4 (also where some 5 configs keep it)
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))
    partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))))
    scaling = rope or legacy
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type == "default":
        return theta, None, partial
    if rope_type == "dynamic":  # HF stretches the base from each input's length: data-dependent frequencies
        raise ValueError(f"{fn}: {kind} rope type 'dynamic' is not supported (its frequencies depend on the input)")
    return theta, {"type": rope_type, **scaling}, partial


def _windows(hf: Mapping[str, Any], kind: str, fn: str) -> tuple[int | None, ...] | None:
    """Per-layer sliding windows (None for full attention), or None when no layer has one."""
    L, W = int(hf["num_hidden_layers"]), hf.get("sliding_window")
    if kind == "mistral":
        return None if W is None else (int(W),) * L
    if kind not in ("qwen2", "qwen3"):
        return None
    types = hf.get("layer_types")
    if types is None:  # transformers 4: the layers from max_window_layers on slide, when use_sliding_window
        if not hf.get("use_sliding_window", False) or W is None:
            return None
        start = int(hf.get("max_window_layers", L))
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(L)]
    if len(types) != L or set(types) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"{fn}: layer_types must name full_attention or sliding_attention for {L} layers")
    if "sliding_attention" not in types:
        return None
    if W is None or not hf.get("use_sliding_window", True):
        raise ValueError(f"{fn}: layer_types name sliding_attention but the config has no sliding_window")
    return tuple(int(W) if t == "sliding_attention" else None for t in types)


def hf_config(config: TransformerConfig, kind: str, /) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of ``config`` as a ``kind`` model (see `family_of`)."""
    c = config
    if kind == "gpt2":
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_embd=c.d_model,
            n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff, n_positions=c.max_seq_len,
            activation_function=_hf_activation(c.activation), layer_norm_epsilon=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
        )  # fmt: skip
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling:
        rope |= {"rope_type": c.rope_scaling["type"]} | {k: v for k, v in c.rope_scaling.items() if k != "type"}
    out: dict[str, Any] = dict(
        model_type=kind, vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_parameters=rope,
    )  # fmt: skip
    if kind.startswith("gemma"):
        windows = c.windows or (None,) * c.n_layers
        W = {w for w in windows if w is not None}
        out |= dict(
            architectures=["Gemma2ForCausalLM" if kind == "gemma2" else "Gemma3ForCausalLM"],
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=c.norm_eps, attention_bias=c.qkv_bias,
            query_pre_attn_scalar=_scalar(c), attn_logit_softcapping=c.attn_softcap,
            final_logit_softcapping=c.final_softcap, sliding_window=W.pop() if W else None,
            layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
        )  # fmt: skip
        if kind == "gemma3_text":
            thetas = c.rope_thetas or (c.rope_theta,) * c.n_layers
            by_type = {t: {**rope, "rope_theta": th} for t, th in zip(out["layer_types"], thetas)}
            out["rope_parameters"] = {"full_attention": rope, "sliding_attention": rope} | by_type
        return out
    if kind == "gpt_neox":
        rope["partial_rotary_factor"] = (c.rotary_dim or c.head_dim) / c.head_dim
        del out["num_key_value_heads"], out["head_dim"]
        return out | dict(
            architectures=["GPTNeoXForCausalLM"], hidden_act=_hf_activation(c.activation), layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.norm_placement == "parallel", attention_bias=c.qkv_bias,
        )  # fmt: skip
    out |= dict(hidden_act="silu", rms_norm_eps=c.norm_eps)
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "olmo2": "Olmo2"}
    out["architectures"] = [names[kind] + "ForCausalLM"]
    if kind in ("llama", "qwen3", "olmo2"):
        out["attention_bias"] = c.qkv_bias
    if kind == "llama":
        out["mlp_bias"] = c.mlp_bias
    if kind == "mistral":
        out["sliding_window"] = None if c.windows is None else c.windows[0]
    if kind in ("qwen2", "qwen3"):
        windows = c.windows or (None,) * c.n_layers
        W = {w for w in windows if w is not None}
        out |= dict(
            layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
            use_sliding_window=bool(W), sliding_window=W.pop() if W else None,
        )  # fmt: skip
    return out


def _scalar(config: TransformerConfig) -> float:
    """Gemma's query_pre_attn_scalar of a scale (an int when it was one: the configs hold ints)."""
    x = (config.attn_scale or config.head_dim**-0.5) ** -2
    return round(x) if abs(x - round(x)) < 1e-6 * x else x


def _hf_activation(name: str) -> str:
    return {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}[name]


def family_of(config: TransformerConfig, /) -> str:
    """The Hugging Face family whose architecture is exactly ``config``'s (ValueError when none is)."""
    c = config
    llama_like = dict(norm_kind="rms", norm_bias=False, norm_offset=0.0, position="rope", activation="swiglu")
    base = all(getattr(c, k) == v for k, v in llama_like.items()) and c.rotary_dim in (None, c.head_dim)
    windows = set(c.windows or (None,))
    plain = c.attn_scale is None and c.attn_softcap is None and c.final_softcap is None and c.embed_scale == 1.0
    plain = plain and c.rope_thetas is None and c.rope_style == "neox"
    candidates = []
    gemma = dict(norm_placement="sandwich", norm_offset=1.0, activation="geglu", norm_kind="rms", position="rope")
    if all(getattr(c, k) == v for k, v in gemma.items()):
        ok = (
            c.qkv_bias == c.o_bias
            and not c.mlp_bias
            and c.rope_style == "neox"
            and len(set(c.windows or (None,)) - {None}) <= 1
        )
        ok = ok and c.embed_scale == c.d_model**0.5 and c.rotary_dim in (None, c.head_dim)
        candidates.append(("gemma3_text" if c.qk_norm == "head" else "gemma2", ok and c.qk_norm in (None, "head")))
    elif c.position == "learned" and c.norm_kind == "layer" and c.norm_bias and c.qkv_bias and c.o_bias:
        candidates.append(("gpt2", c.mlp_bias and c.norm_placement == "pre" and c.qk_norm is None))
    elif c.norm_kind == "layer":
        ok = c.norm_bias and c.mlp_bias and c.qkv_bias == c.o_bias and c.norm_placement in ("pre", "parallel")
        candidates.append(("gpt_neox", ok and c.position == "rope" and c.qk_norm is None and plain))
    elif base and plain:
        pre = c.norm_placement == "pre"
        if c.norm_placement == "post":
            candidates.append(("olmo2", c.qk_norm == "projection" and c.windows is None and c.qkv_bias == c.o_bias))
        elif pre and c.qk_norm == "head":
            candidates.append(("qwen3", c.qkv_bias == c.o_bias and not c.mlp_bias and len(windows - {None}) <= 1))
        elif pre and c.qk_norm is None and c.qkv_bias and not c.o_bias:
            candidates.append(("qwen2", not c.mlp_bias and len(windows - {None}) <= 1))
        elif pre and c.qk_norm is None and len(windows) == 1 and None not in windows:
            candidates.append(("mistral", not (c.qkv_bias or c.o_bias or c.mlp_bias)))
        elif pre and c.qk_norm is None and c.windows is None:
            candidates.append(("llama", c.qkv_bias == c.o_bias))
    for kind, ok in candidates:
        if ok:
            return kind
    raise ValueError(f"save_hf: no Hugging Face family in {', '.join(MODEL_TYPES)} has this architecture: {config}")
