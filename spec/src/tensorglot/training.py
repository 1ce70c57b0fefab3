"""Training, `tensorglot.layers.Layers.loss` and `value_and_grad`: the mean next-token cross-entropy and
the whole model's backward pass, written once from the kernels' explicit ``*_backward``.

The forward pass keeps a tape (per block x, the attention's input a, its projections before the
QK-norm, q and k after RoPE, v, the attention output y, the sublayer outputs a post-norm reads, h and
the MLP's input m; then the final x, its norm n and a softcap's tanh) and the backward walks it in
reverse: the loss, the softcap, the head, the final norm, each block (its MLP, attention and norms in
the order the config's placement put them), and last the embedding, whose rows add up over every
position that reads them (and, tied, over the head's use), and the learned positions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from array_api_compat import array_namespace, device

from . import checks
from .forward import _fold_biases, _head, _on_device, _Pass, mlp_names
from .frontend import index_ids, shape
from .kernels import GATES
from .param_layout import GATED, block_norms

if TYPE_CHECKING:
    from .layers import Layers

Array = Any
#: ZB-H1's deferred weight gradients: (parameter name, the linear's input x, its output's gradient dy,
#: the parameter's shape); W computes each as xᵀ · dy.
Deferred = list[tuple[str, Array, Array, tuple[int, ...]]]


def _inputs(layers: Layers, fn: str, tokens: Any, targets: Any, params: Any, config: Any) -> Any:
    params, dtype = layers._model(fn, params, config)
    tokens = index_ids(layers._tokens(fn, "tokens", tokens, config, params))
    targets = index_ids(layers._tokens(fn, "targets", targets, config, params))
    checks.check_same_shape(fn, "targets", shape(targets), shape(tokens), "tokens")
    return _Pass(params, dtype, config, array_namespace(tokens)), tokens, targets


def loss(layers: Layers, tokens: Any, targets: Any, params: Any, config: Any) -> Array:
    p, tokens, targets = _inputs(layers, "loss", tokens, targets, params, config)
    return layers._run(layers._k.cross_entropy, p.dtype, (layers._forward(tokens, p),), targets)


def value_and_grad(layers: Layers, tokens: Any, targets: Any, params: Any, config: Any) -> Any:
    p, tokens, targets = _inputs(layers, "value_and_grad", tokens, targets, params, config)
    k, run, c, dt = layers._k, layers._run, p.config, p.dtype
    back = _Backward(layers, p)
    p.tape = []
    logits = layers._forward(tokens, p)  # (B, S, V)
    value = run(k.cross_entropy, dt, (logits,), targets)
    dloss = p.xp.ones((), dtype=logits.dtype, device=device(logits))
    dlogits = run(k.cross_entropy_backward, dt, (logits, dloss), targets)
    final = p.tape.pop()
    if final["t"] is not None:  # logits = cap · tanh(z / cap)
        dlogits = dlogits * (1.0 - final["t"] * final["t"])
    dn, dhead, _ = run(k.linear_backward, dt, (final["n"], _head(p.params, c), dlogits), False)
    dx = back.norm(final["x"], "norm", dn)
    for i in reversed(range(c.n_layers)):
        dx = back.block(dx, i, p.tape[i])
    grads = back.grads
    if c.position == "learned":
        B, S = shape(tokens)
        positions = _on_device(np.broadcast_to(np.arange(S), (B, S)).copy(), tokens)  # (B, S)
        grads["pos_embed"] = run(k.embedding_backward, dt, (dx,), positions, c.max_seq_len)
    if c.embed_scale != 1.0:
        dx = dx * c.embed_scale
    dembed = run(k.embedding_backward, dt, (dx,), tokens, c.vocab_size)  # a token used twice gets both
    if c.tie_embeddings:
        dembed = dembed + dhead.T
    else:
        grads["lm_head"] = dhead
    grads["embed"] = dembed
    return value, {name: grads[name] for name in params}


class _Backward:
    """The backward of each piece of the forward pass, adding parameter gradients to ``grads``."""

    def __init__(self, layers: Layers, p: _Pass) -> None:
        self.layers, self.p, self.k, self.run = layers, p, layers._k, layers._run
        self.c, self.dt, self.xp = p.config, p.dtype, p.xp
        self.grads: dict[str, Array] = {}
        self.deferred: Deferred | None = None  # ZB-H1's B: the linears' weight gradients are left to W

    def block(self, dout: Array, layer: int, s: dict[str, Array]) -> Array:
        """dx of one block; ``s`` is what its forward saved."""
        pre, c = f"layers.{layer}.", self.c
        attn_norm, post_attn_norm, mlp_norm, post_mlp_norm = block_norms(c)
        # out = h + post(mlp(m)), m = norm(h) (parallel: norm(x))
        dz = dout if post_mlp_norm is None else self.norm(s["z"], pre + post_mlp_norm, dout)
        dm = self.mlp(s["m"], layer, dz)
        parallel = c.norm_placement == "parallel"
        if mlp_norm is not None:
            dm = self.norm(s["x"] if parallel else s["h"], pre + mlp_norm, dm)
        dh = dout if parallel else dout + dm
        # h = x + post(attention(a)), a = norm(x)
        do = dh if post_attn_norm is None else self.norm(s["o"], pre + post_attn_norm, dh)
        da = self.attention(s, layer, do)
        dx = dh + (da if attn_norm is None else self.norm(s["x"], pre + attn_norm, da))
        return dx + dm if parallel else dx

    def attention(self, s: dict[str, Array], layer: int, do: Array) -> Array:
        k, run, xp, c, dt, w = self.k, self.run, self.xp, self.c, self.dt, self.p.params
        pre = f"layers.{layer}."
        B, S, D = shape(do)
        N, K, H = c.n_heads, c.n_kv_heads, c.head_dim
        wo = xp.reshape(w[pre + "wo"], (N * H, D))
        if self.deferred is not None:
            dy = self.input_grad(s["y"], wo, do, pre + "wo")
        else:
            dy, dwo, dbo = run(k.linear_backward, dt, (s["y"], wo, do), c.o_bias)
            self.grads[pre + "wo"] = xp.reshape(dwo, (N, H, D))
            if c.o_bias:
                self.grads[pre + "bo"] = dbo
        dy = xp.reshape(dy, (B, S, N, H))  # (B, S, N, H)
        scale = c.attn_scale or 1.0 / math.sqrt(H)
        options = (s["causal"], s["mask"], scale, *self.layers._softcap(self.p))
        dq, dk, dv = run(k.attention_backward, dt, (s["q"], s["k"], s["v"], dy), *options)
        rope = self.layers._rope
        dq, dk = rope(dq, self.p, -1.0, layer), rope(dk, self.p, -1.0, layer)  # the inverse rotation
        da = None
        for name, d, heads in (("q", dq, N), ("k", dk, K), ("v", dv, K)):
            d = self.qk_norm(s.get(name + "_lin"), pre + name + "_norm", d, heads)  # (B, S, heads·H)
            w2 = xp.reshape(w[pre + "w" + name], (D, heads * H))
            if self.deferred is not None:
                dxi = self.input_grad(s["a"], w2, d, pre + "w" + name)
                da = dxi if da is None else da + dxi
                continue
            dxi, dw, db = run(k.linear_backward, dt, (s["a"], w2, d), c.qkv_bias)
            da = dxi if da is None else da + dxi
            self.grads[pre + "w" + name] = xp.reshape(dw, (D, heads, H))
            if c.qkv_bias:
                self.grads[pre + "b" + name] = xp.reshape(db, (heads, H))
        return da

    def qk_norm(self, lin: Array | None, name: str, d: Array, heads: int) -> Array:
        """The gradient of a projection (B, S, heads·H) from that of its QK-normed heads (B, S, heads, H)."""
        xp, c = self.xp, self.c
        B, S = shape(d)[:2]
        flat = (B, S, heads * c.head_dim)
        if c.qk_norm is None or lin is None:
            return xp.reshape(d, flat)
        if c.qk_norm == "head":
            dx, self.grads[name] = self.rms(xp.reshape(lin, shape(d)), self.p.params[name], d)
            return xp.reshape(dx, flat)
        dx, self.grads[name] = self.rms(lin, self.p.params[name], xp.reshape(d, flat))
        return dx

    def mlp(self, m: Array, layer: int, dz: Array) -> Array:
        k, run, xp, c, dt, w = self.k, self.run, self.xp, self.c, self.dt, self.p.params
        pre = f"layers.{layer}."
        names = [n for n in mlp_names(c) if n.startswith("w")]
        weights = [w[pre + n] for n in names]
        if self.deferred is not None:
            return self.mlp_input_grad(m, [pre + n for n in names], weights, dz)
        x = m
        if c.mlp_bias:
            x, weights, _ = _fold_biases(m, weights, w, pre, c, xp)
        if c.activation in GATED:
            dx, *dws = run(k.gated_mlp_backward, dt, (x, *weights, dz), GATES[c.activation])
        else:
            dx, *dws = run(k.mlp_backward, dt, (x, *weights, dz), c.activation)
        if not c.mlp_bias:
            self.grads.update(zip((pre + n for n in names), dws))
            return dx
        D = c.d_model
        biases = [n for n in mlp_names(c) if n.startswith("b")]  # the inputs' biases, then the output's
        for name, bias, dw in zip(names[:-1], biases, dws[:-1]):
            self.grads[pre + name], self.grads[pre + bias] = dw[:D, :], dw[D, :]  # the folded row is the bias
        self.grads[pre + names[-1]] = dws[-1]
        self.grads[pre + biases[-1]] = xp.sum(xp.reshape(dz, (-1, D)), axis=0)
        return dx[..., :D]

    # ZB-H1's B (arXiv:2401.10241): the input gradient through each linear, dx = dy · wᵀ, keeping what
    # its weight gradient xᵀ · dy needs (x and dy) for W (`_weight_grads`). Linears without biases only
    # (the Llama block the parallel step runs); the norms' gradients stay in B.
    def input_grad(self, x: Array, w2: Array, dy: Array, name: str) -> Array:
        """dy · wᵀ, leaving (name, x, dy) for W."""
        self._defer(name, x, dy, shape(self.p.params[name]))
        return self.run(self.k.linear, self.dt, (dy, w2.T, None))

    def _defer(self, name: str, x: Array, dy: Array, to: tuple[int, ...]) -> None:
        c = self.c
        if self.deferred is None or c.qkv_bias or c.o_bias or c.mlp_bias:
            raise ValueError(f"_Backward: {name}'s weight gradient can be deferred only in a B pass without biases")
        self.deferred.append((name, x, dy, to))

    def mlp_input_grad(self, m: Array, names: list[str], weights: list[Array], dz: Array) -> Array:
        """dm of the MLP unfused, its linears one by one and the activation between them, recomputing
        the hidden layer as the fused kernel does."""
        k, run, dt, act = self.k, self.run, self.dt, self.c.activation

        def lin(x: Array, w2: Array) -> Array:
            return run(k.linear, dt, (x, w2, None))

        *inputs, w_last = weights
        pre = [lin(m, w) for w in inputs]  # (B, S, F): the gate and up projections, or the one input's
        dlast = lin(dz, w_last.T)  # the gradient of the last linear's input
        if act in GATED:
            g, u = pre
            s = self.activation(g, GATES[act], None)
            dg, du = self.activation(g, GATES[act], dlast * u), dlast * s
            self._defer(names[0], m, dg, shape(inputs[0]))
            self._defer(names[1], m, du, shape(inputs[1]))
            self._defer(names[2], s * u, dz, shape(w_last))
            return lin(dg, inputs[0].T) + lin(du, inputs[1].T)
        dh = self.activation(pre[0], act, dlast)
        self._defer(names[0], m, dh, shape(inputs[0]))
        self._defer(names[1], self.activation(pre[0], act, None), dz, shape(w_last))
        return lin(dh, inputs[0].T)

    def activation(self, h: Array, name: str, dy: Array | None) -> Array:
        """act(h), or with ``dy`` act'(h) · dy. The kernels hold the activations only inside the fused
        MLPs: a 1 × 1 MLP of unit weights is the activation alone, so its kernels give both exactly."""
        xp = self.xp
        one = xp.ones((1, 1), dtype=h.dtype, device=device(h))
        flat = xp.reshape(h, (-1, 1))  # (B·S·F, 1): every element a sample
        if dy is None:
            out = self.run(self.k.mlp, self.dt, (flat, one, one), name)
        else:
            out = self.run(self.k.mlp_backward, self.dt, (flat, one, one, xp.reshape(dy, (-1, 1))), name)[0]
        return xp.reshape(out, shape(h))

    def norm(self, x: Array, name: str, dy: Array) -> Array:
        """dx of the norm ``name`` (of the config's kind) applied to x; its weight's (and bias's) gradient."""
        c, w = self.c, self.p.params
        if c.norm_kind == "layer":
            dx, dw, db = self.run(self.k.layer_norm_backward, self.dt, (x, w[name], dy), c.norm_eps, c.norm_bias)
            if c.norm_bias:
                self.grads[name + "_bias"] = db
        else:
            dx, dw = self.rms(x, w[name], dy)
        self.grads[name] = dw
        return dx

    def rms(self, x: Array, weight: Array, dy: Array) -> tuple[Array, Array]:
        c = self.c
        return self.run(self.k.rms_norm_backward, self.dt, (x, weight, dy), c.norm_eps, float(c.norm_offset))


# The two halves of a block's backward, for the parallel step's units (`tensorglot.parallel.transformer_blocks`),
# which put their collectives between them: each adds its parameters' gradients to ``grads``.
# With ``deferred`` (ZB-H1's B) each leaves its linears' weight gradients there, for `_weight_grads`.
def _mlp_backward(
    layers: Layers, dz: Array, p: _Pass, layer: int, s: dict[str, Array], grads: dict, deferred: Deferred | None = None
) -> Array:
    """Back through ``mlp(m)``: dm (a tensor-parallel rank's partial sum when its weights are shards)."""
    back = _Backward(layers, p)
    back.deferred = deferred
    dm = back.mlp(s["m"], layer, dz)
    grads.update(back.grads)
    return dm


def _attention_backward(
    layers: Layers, do: Array, p: _Pass, layer: int, s: dict[str, Array], grads: dict, deferred: Deferred | None = None
) -> Array:
    """Back through ``attention(a)`` and its output projection: da."""
    back = _Backward(layers, p)
    back.deferred = deferred
    da = back.attention(s, layer, do)
    grads.update(back.grads)
    return da


def _weight_grads(layers: Layers, dtype: str, deferred: Deferred, grads: dict) -> None:
    """ZB-H1's W: each deferred linear's weight gradient xᵀ · dy (over every position), into ``grads``."""
    for name, x, dy, to in deferred:
        xp = array_namespace(x)
        x2, dy2 = xp.reshape(x, (-1, shape(x)[-1])), xp.reshape(dy, (-1, shape(dy)[-1]))  # (B·S, in), (B·S, out)
        grads[name] = xp.reshape(layers._run(layers._k.linear, dtype, (x2.T, dy2, None)), to)
