"""Greedy decoding, `tensorglot.layers.Layers.generate`: the prompt once, then one token a step through a
KV cache, or the whole prefix recomputed at every step (the oracle the cache is held to)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from . import checks
from .cache import KINDS
from .forward import _Pass
from .frontend import shape
from .kernels import namespace

if TYPE_CHECKING:
    from .layers import Layers

Array = Any


def generate_inputs(layers: Layers, params: Any, config: Any, prompt: Any, max_new_tokens: Any, cache: Any) -> Any:
    """``(params, dtype, prompt, new)`` validated, for the spec's `generate` and a backend's override."""
    fn = "generate"
    params, dtype = layers._model(fn, params, config)
    prompt = layers._tokens(fn, "prompt", prompt, config, params)
    new = layers._index(fn, "max_new_tokens", max_new_tokens, allow_zero=True)
    P = shape(prompt)[1]
    if P + new > config.max_seq_len:
        raise ValueError(f"{fn}: prompt length {P} + max_new_tokens {new} > max_seq_len = {config.max_seq_len}")
    if cache is not None:
        checks.check_choice(fn, "cache", cache, KINDS)
    return params, dtype, prompt, new


def greedy(logits: Array, dtype: Any) -> Array:
    """(B, 1): the argmax of each sequence's last logits, the first maximum on ties, in ``dtype``."""
    xp = namespace(logits)
    return xp.astype(xp.argmax(logits[:, -1, :], axis=-1), dtype)[:, None]


def generate(layers: Layers, params: Any, config: Any, prompt: Any, max_new_tokens: Any, cache: Any) -> Array:
    params, dtype, prompt, new = generate_inputs(layers, params, config, prompt, max_new_tokens, cache)
    if new == 0:
        return prompt
    # every step reads every weight again: a backend may repack them for its products for this call
    with getattr(layers._k, "inference", contextlib.nullcontext)(params):
        return _decode(layers, params, config, prompt, new, dtype, cache)


def _decode(layers: Layers, params: Any, config: Any, prompt: Array, new: int, dtype: Any, cache: Any) -> Array:
    xp = namespace(prompt)
    if cache is None:
        p = _Pass(params, dtype, config, xp)
        out = prompt
        for _ in range(new):
            out = xp.concat([out, greedy(layers._forward(out, p), prompt.dtype)], axis=1)
        return out
    B, P = shape(prompt)
    p = _Pass(params, dtype, config, xp, cache=layers.kv_cache(config, B, P + new, kind=cache, dtype=dtype))
    pieces = [prompt]
    logits = layers._transformer(prompt, p)
    for step in range(new):
        pieces.append(greedy(logits, prompt.dtype))
        if step + 1 < new:
            p.next_step()
            logits = layers._transformer(pieces[-1], p)
    return xp.concat(pieces, axis=1)
