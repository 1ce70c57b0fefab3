"""JAX's layers: the spec's `tensorglot.layers.Layers` with `transformer` and `generate` compiled.

Both overrides run the spec's own forward pass (`tensorglot.forward`) inside ``jax.jit``, after the
spec's host-side validation, and the conformance suite holds them to the spec's eager methods. With a
cache, the spec's `KVCache` keeps its bookkeeping on the host (reserve, advance) and the compiled step
sees its storage through the spec's `StaticCache` (``T = max_len`` keys, the unwritten ones masked), so
a step compiles once per token count. `generate` is one program: the prompt's pass, then a
``lax.fori_loop`` of single-token steps, over a `SlotMap`/`PagedSlotMap` of the kind with every block
the generation needs reserved up front.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tensorglot.cache import BLOCK_SIZE, make_slot_map
from tensorglot.forward import _Pass
from tensorglot.frontend import shape
from tensorglot.generate import generate_inputs, greedy
from tensorglot.layers import Layers
from tensorglot.static_cache import StaticCache


class JaxLayers(Layers):
    def transformer(self, tokens, params, config, /, *, cache=None, positions=None):
        p, tokens = self._transformer_inputs("transformer", tokens, params, config, cache, positions)
        if cache is None:
            return _forward(self, tokens, p.params, p.positions, config=config)
        # The cache's bookkeeping runs here, on the host; the step is compiled over its storage with every
        # position's slot (T = max_len, the unwritten keys masked), so it compiles once per token count.
        S = shape(tokens)[1]
        cache.reserve(S)  # raises past capacity before anything is written
        if not cache.k:
            cache.allocate(p.params["embed"])
        table = jnp.asarray(cache.map.gather(cache.max_len), jnp.int32)  # (B, max_len)
        lengths = jnp.asarray(cache.lengths(), jnp.int32)
        try:
            logits, cache.k, cache.v = _cached(
                self, tokens, p.params, p.positions, cache.k, cache.v, lengths, table, config=config, kind=cache.kind
            )
        except BaseException:
            cache.cancel()  # a failed call changes no cache
            raise
        cache.advance(S)
        return logits

    def generate(self, params, config, prompt, /, *, max_new_tokens, cache="contiguous"):
        params, _, prompt, new = generate_inputs(self, params, config, prompt, max_new_tokens, cache)
        if new == 0:
            return prompt
        return _generate(self, params, prompt, config=config, new=new, kind=cache)


def _pass(layers: JaxLayers, params: dict, config: Any, **kw: Any) -> _Pass:
    dtype = layers._be.dtype_name(params["embed"])
    return _Pass(params, dtype, config, jnp, **kw)


@partial(jax.jit, static_argnames=("layers", "config"))
def _forward(layers, tokens, params, positions, *, config):
    return layers._forward(tokens, _pass(layers, params, config, positions=positions))


@partial(jax.jit, static_argnames=("layers", "config", "kind"))
def _cached(layers, tokens, params, positions, ks, vs, lengths, table, *, config, kind):
    cache = StaticCache(layers._k.cache_write, kind, table, ks, vs, lengths)
    logits = layers._transformer(tokens, _pass(layers, params, config, positions=positions, cache=cache))
    return logits, cache.k, cache.v


@partial(jax.jit, static_argnames=("layers", "config", "new", "kind"))
def _generate(layers, params, prompt, *, config, new, kind):
    B, P = shape(prompt)
    L = P + new
    out = jnp.zeros((B, L), prompt.dtype).at[:, :P].set(prompt)
    if kind is None:  # recompute: causal attention keeps the unwritten tokens from reaching position t − 1

        def recompute(t, out):
            logits = layers._forward(out, _pass(layers, params, config))  # (B, L, V)
            last = lax.dynamic_slice_in_dim(logits, t - 1, 1, axis=1)  # (B, 1, V)
            return lax.dynamic_update_slice(out, greedy(last, out.dtype), (0, t))

        return lax.fori_loop(P, L, recompute, out)

    slot_map = make_slot_map(kind, B, L, block_size=BLOCK_SIZE)
    slot_map.reserve(L)  # every block now, in the spec's order: the slot of each position is static
    table = jnp.asarray(slot_map.gather(L), jnp.int32)  # (B, L)
    rows = (config.n_kv_heads, slot_map.num_slots, config.head_dim)  # (K, slots, H), as the KVCache's
    storage = [jnp.zeros(rows, params["embed"].dtype) for _ in range(config.n_layers)]

    def step(tokens, ks, vs, lengths):
        cache = StaticCache(layers._k.cache_write, kind, table, ks, vs, lengths)
        logits = layers._transformer(tokens, _pass(layers, params, config, cache=cache))
        return greedy(logits, out.dtype), cache.k, cache.v, cache.lengths()

    nxt, ks, vs, lengths = step(prompt, storage, storage, jnp.zeros(B, jnp.int32))
    out = lax.dynamic_update_slice(out, nxt, (0, P))

    def body(t, carry):
        out, ks, vs, lengths = carry
        nxt, ks, vs, lengths = step(lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1), ks, vs, lengths)
        return lax.dynamic_update_slice(out, nxt, (0, t)), ks, vs, lengths

    return lax.fori_loop(P + 1, L, body, (out, ks, vs, lengths))[0]
