"""Hugging Face checkpoints both ways: `load_hf` reads a model directory of any family in
`MODEL_TYPES` into the spec's params and `TransformerConfig`; `save_hf` writes one that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same logits.

`load_hf(dir)` returns ``(params, config)``: NumPy arrays named as in `tensorglot.params` and a
`TransformerConfig`, so any backend runs the model with ``be.layers.transformer(tokens, params, config)``.
The architecture lives in the config, not here: each family's ``config.json`` becomes the fields that
describe it (`hf_config`), its tensors the params (`hf_state`, where the name mapping is written).

RoPE: HF's ``rotate_half`` pairs feature i with i + H/2 — our ``rope_style="neox"``. The q and k
projections in an HF checkpoint are already in that order (the conversion script from Meta's
interleaved weights permutes them once, ``permute`` in ``convert_llama_weights_to_hf.py``), so no
permutation happens here; the tests check the logits against ``transformers``.

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

from ..params import TransformerConfig, check_params
from .hf_config import MODEL_TYPES, config_from_hf, family_of, hf_config, model_type
from .hf_state import to_params, to_state

__all__ = ["MODEL_TYPES", "load_hf", "save_hf", "load_llama", "hf_config_to_config", "hf_state_to_params"]

#: Tensors a checkpoint may hold that are buffers, not parameters (recomputed from the config).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")


def hf_config_to_config(hf: Mapping[str, Any], /) -> TransformerConfig:
    """A `TransformerConfig` from a Hugging Face config dict (``config.json``); a config without
    ``model_type`` is read as a Llama."""
    return config_from_hf(hf)


#: A layer's index in any family's tensor names (``model.layers.3.``, GPT-2's ``transformer.h.3.``).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def hf_state_to_params(
    state: Mapping[str, np.ndarray],
    config: TransformerConfig,
    /,
    *,
    dtype: str | None = None,
    model_type: str = "llama",
) -> dict[str, np.ndarray]:
    """The spec's params from a state dict of ``model_type`` (NumPy arrays, HF names); ``dtype`` casts
    them. A missing tensor or one the config has no place for raises ValueError naming it."""
    fn = "checkpoints.hf_state_to_params"
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"{fn}: the checkpoint has no {name!r} (a {model_type} state dict was expected)")
        used.add(name)
        return np.asarray(state[name])

    params = to_params(config, model_type, get)
    unused = sorted(k for k in set(state) - used if not k.endswith(_BUFFERS))
    if config.tie_embeddings:
        unused = [k for k in unused if k not in ("lm_head.weight", "embed_out.weight")]  # the tied copy
    past = sorted({int(m.group(1)) for k in unused if (m := _LAYER.search(k)) and int(m.group(1)) >= config.n_layers})
    if past:  # a config that undercounts would otherwise run a shallower model
        raise ValueError(
            f"{fn}: the checkpoint holds layers {past} past num_hidden_layers = {config.n_layers}; the config "
            "and the weights disagree (no layer is dropped)"
        )
    if unused:
        raise ValueError(f"{fn}: the checkpoint holds tensors the config has no place for: {unused[:8]}")
    check_params(fn, {k: v.shape for k, v in params.items()}, config)
    out_dtype = dtype or str(params["embed"].dtype)
    return {k: np.ascontiguousarray(v, dtype=out_dtype) for k, v in params.items()}


def load_hf(
    path: str | os.PathLike[str], /, *, dtype: str | None = None
) -> tuple[dict[str, np.ndarray], TransformerConfig]:
    """``(params, config)`` from a Hugging Face model directory: ``config.json`` and ``model.safetensors``
    (or the shards a ``model.safetensors.index.json`` lists), of any ``model_type`` in `MODEL_TYPES`.
    bfloat16 weights are widened to float32 (NumPy has no bfloat16); ``dtype`` None keeps the stored
    dtype. An unknown ``model_type`` or a config key whose value cannot be honoured raises ValueError.
    """
    fn = "checkpoints.load_hf"
    root = os.fspath(path)
    config_path = os.path.join(root, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{fn}: {root!r} has no config.json (a Hugging Face model directory was expected)")
    with open(config_path) as fh:
        hf = json.load(fh)
    config = config_from_hf(hf, fn)
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
    return hf_state_to_params(state, config, dtype=dtype, model_type=model_type(hf, fn)), config


def load_llama(
    path: str | os.PathLike[str], /, *, dtype: str | None = "float32"
) -> tuple[dict[str, np.ndarray], TransformerConfig]:
    """`load_hf`, kept under its first name (it reads every family now); float32 unless told otherwise."""
    return load_hf(path, dtype=dtype)


def save_hf(
    path: str | os.PathLike[str],
    params: Mapping[str, Any],
    config: TransformerConfig,
    /,
    *,
    model_type: str | None = None,
) -> str:
    """Write ``params`` of ``config`` as a Hugging Face model directory (``config.json`` and
    ``model.safetensors``) of family ``model_type`` (default: `family_of`, the one family whose
    architecture is exactly the config's; ValueError when none is). Returns the family written."""
    fn = "checkpoints.save_hf"
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(v) for k, v in params.items()}
    check_params(fn, {k: v.shape for k, v in arrays.items()}, config)
    kind = model_type or family_of(config)
    if kind not in MODEL_TYPES:
        raise ValueError(f"{fn}: model_type {kind!r} is not supported, wanted one of {', '.join(MODEL_TYPES)}")
    hf = hf_config(config, kind)
    if config_from_hf(hf, fn) != config:  # the family cannot say everything the config says
        raise ValueError(f"{fn}: a {kind} config cannot describe this model: {config}")
    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in to_state(arrays, config, kind).items()}
    save_file(state, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    hf["dtype"] = str(arrays["embed"].dtype)
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    return kind


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
