"""Training, `tensorglot.layers.Layers.loss` and `value_and_grad`: the mean next-token cross-entropy and
the whole model's backward pass, written once from the kernels' explicit ``*_backward``.

The forward pass keeps a tape (per block x, its norm a, q, k, v after RoPE, the attention output y, h
and its norm m; then the final x and its norm n) and the backward walks it in reverse: the loss, the
head, the final norm, each block (MLP, its norm, wo, attention, the inverse rotation, the three
projections, the first norm), and last the embedding, whose rows add up over every position that reads
them (and, tied, over the head's use).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from array_api_compat import array_namespace, device

from . import checks
from .forward import _head, _mlp_names, _Pass
from .frontend import shape

if TYPE_CHECKING:
    from .layers import Layers

Array = Any


def _inputs(layers: Layers, fn: str, tokens: Any, targets: Any, params: Any, config: Any) -> Any:
    params, dtype = layers._model(fn, params, config)
    tokens = layers._tokens(fn, "tokens", tokens, config, params)
    targets = layers._tokens(fn, "targets", targets, config, params)
    checks.check_same_shape(fn, "targets", shape(targets), shape(tokens), "tokens")
    return _Pass(params, dtype, config, array_namespace(tokens)), tokens, targets


def loss(layers: Layers, tokens: Any, targets: Any, params: Any, config: Any) -> Array:
    p, tokens, targets = _inputs(layers, "loss", tokens, targets, params, config)
    return layers._run(layers._k.cross_entropy, p.dtype, (layers._forward(tokens, p),), targets)


def value_and_grad(layers: Layers, tokens: Any, targets: Any, params: Any, config: Any) -> Any:
    p, tokens, targets = _inputs(layers, "value_and_grad", tokens, targets, params, config)
    k, run, c, dt = layers._k, layers._run, p.config, p.dtype
    p.tape = []
    logits = layers._forward(tokens, p)  # (B, S, V)
    value = run(k.cross_entropy, dt, (logits,), targets)
    dloss = p.xp.ones((), dtype=logits.dtype, device=device(logits))
    dlogits = run(k.cross_entropy_backward, dt, (logits, dloss), targets)
    grads: dict[str, Array] = {}
    final = p.tape.pop()
    dn, dhead, _ = run(k.linear_backward, dt, (final["n"], _head(p.params, c), dlogits), False)
    dx, grads["norm"] = run(k.rms_norm_backward, dt, (final["x"], p.params["norm"], dn), c.norm_eps)
    for i in reversed(range(c.n_layers)):
        dx = _block_backward(layers, dx, p, i, p.tape[i], grads)
    dembed = run(k.embedding_backward, dt, (dx,), tokens, c.vocab_size)  # a token used twice gets both
    if c.tie_embeddings:
        dembed = dembed + dhead.T
    else:
        grads["lm_head"] = dhead
    grads["embed"] = dembed
    return value, {name: grads[name] for name in params}


def _block_backward(layers: Layers, dout: Array, p: _Pass, layer: int, s: dict[str, Array], grads: dict) -> Array:
    """Add the block's parameter gradients to ``grads``; return dx. ``s`` is what the forward saved."""
    k, run, w, eps, pre = layers._k, layers._run, p.params, p.config.norm_eps, f"layers.{layer}."
    # out = h + mlp(m), m = rms_norm(h)
    dm = _mlp_backward(layers, dout, p, layer, s, grads)
    dh_norm, grads[pre + "mlp_norm"] = run(k.rms_norm_backward, p.dtype, (s["h"], w[pre + "mlp_norm"], dm), eps)
    dh = dout + dh_norm
    # h = x + attention(a) · wo, a = rms_norm(x)
    da = _attention_backward(layers, dh, p, layer, s, grads)
    dx_norm, grads[pre + "attn_norm"] = run(k.rms_norm_backward, p.dtype, (s["x"], w[pre + "attn_norm"], da), eps)
    return dh + dx_norm


def _mlp_backward(layers: Layers, dout: Array, p: _Pass, layer: int, s: dict[str, Array], grads: dict) -> Array:
    """Back through ``mlp(m)``: add its weights' gradients to ``grads``, return dm (a tensor-parallel
    rank's partial sum when its weights are column and row shards)."""
    k, run, dt, pre = layers._k, layers._run, p.dtype, f"layers.{layer}."
    mlp_names = _mlp_names(p.config)
    mlp_weights = tuple(p.params[pre + n] for n in mlp_names)
    if p.config.activation == "swiglu":
        dm, *dws = run(k.swiglu_backward, dt, (s["m"], *mlp_weights, dout))
    else:
        dm, *dws = run(k.mlp_backward, dt, (s["m"], *mlp_weights, dout), p.config.activation)
    grads.update(zip((pre + n for n in mlp_names), dws))
    return dm


def _attention_backward(layers: Layers, dh: Array, p: _Pass, layer: int, s: dict[str, Array], grads: dict) -> Array:
    """Back through ``attention(a) · wo``: add the four projections' gradients to ``grads``, return da."""
    k, run, xp, c, dt = layers._k, layers._run, p.xp, p.config, p.dtype
    pre, w = f"layers.{layer}.", p.params
    B, S, D = shape(dh)
    N, K, H = c.n_heads, c.n_kv_heads, c.head_dim
    dy, dwo, _ = run(k.linear_backward, dt, (s["y"], xp.reshape(w[pre + "wo"], (N * H, D)), dh), False)
    grads[pre + "wo"] = xp.reshape(dwo, (N, H, D))
    dy = xp.reshape(dy, (B, S, N, H))  # (B, S, N, H)
    dq, dk, dv = run(k.attention_backward, dt, (s["q"], s["k"], s["v"], dy), True, None, 1.0 / math.sqrt(H))
    dq, dk = layers._rope(dq, p, -1.0), layers._rope(dk, p, -1.0)  # the inverse rotation
    da = None
    for name, d, heads in (("wq", dq, N), ("wk", dk, K), ("wv", dv, K)):
        w2 = xp.reshape(w[pre + name], (D, heads * H))
        dxi, dw, _ = run(k.linear_backward, dt, (s["a"], w2, xp.reshape(d, (B, S, heads * H))), False)
        da = dxi if da is None else da + dxi
        grads[pre + name] = xp.reshape(dw, (D, heads, H))
    return da
