"""The transformer cut into the units a parallel step moves between collectives: the embedding, each
block, and the head (final norm, output projection, loss), each forward and backward on its own.

A unit runs the backend's kernels through its `tensorglot.layers.Layers` (the same forward and the same
explicit backward halves as `tensorglot.training`), on whatever weights it is given: whole, gathered
from shards (fsdp), or a tensor-parallel rank's heads and MLP columns, with `local_config` describing
them. A block's two sublayers meet the residual stream through a `Split`, Megatron's f and g operators
(arXiv:1909.08053 §3; sequence parallel: arXiv:2205.05198 §4.2.2), so one block function serves
every strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from ..forward import _head, _Pass, mlp_names
from ..frontend import index_ids
from ..params import TransformerConfig
from ..training import Deferred, _attention_backward, _mlp_backward, _weight_grads

Array = Any
Hook = Callable[[Array, str], Array]


def _same(x: Array, tensor: str, /) -> Array:
    return x


@dataclass(frozen=True)
class Split:
    """How a sublayer meets the residual stream: ``enter`` takes a norm's output to the sublayer's input
    (f), ``leave`` the sublayer's output back to the stream (g); ``enter_grad`` and ``leave_grad`` are
    their backwards. One device: identities. tp: f is the identity (its backward all-reduces the input
    gradient), g all-reduces. sp: f all-gathers the sequence, g reduce-scatters it, and their backwards
    swap the two."""

    enter: Hook = _same
    enter_grad: Hook = _same
    leave: Hook = _same
    leave_grad: Hook = _same


WHOLE = Split()


def block_names(config: TransformerConfig, layer: int, /) -> list[str]:
    """A block's parameter names, in `param_shapes` order."""
    own = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", *mlp_names(config))
    return [f"layers.{layer}.{n}" for n in own]


def head_names(config: TransformerConfig, /) -> list[str]:
    """What the head reads: the final norm and the output projection (``embed`` when tied)."""
    return ["norm", "embed" if config.tie_embeddings else "lm_head"]


def local_config(config: TransformerConfig, tp: int, /) -> TransformerConfig:
    """The config a tensor-parallel rank's block weights describe: N/t query heads, max(K/t, 1) kv heads
    (a kv head is replicated on the t/K ranks whose query heads read it when K < t), F/t hidden units."""
    if tp == 1:
        return config
    kv = max(config.n_kv_heads // tp, 1)
    return dataclasses.replace(config, n_heads=config.n_heads // tp, n_kv_heads=kv, d_ff=config.d_ff // tp)


@dataclass(frozen=True)
class Model:
    """What every unit needs: the backend's layers, the (rank's) config and the step's dtype."""

    layers: Any  # a backend's tensorglot.layers.Layers
    config: TransformerConfig
    dtype: str
    xp: Any
    positions: Array | None = None  # RoPE's, (S,); None is arange(S) (cp: the rank's own positions)

    def pass_(self, weights: dict[str, Array]) -> _Pass:
        return _Pass(weights, self.dtype, self.config, self.xp, self.positions)

    def run(self, kernel: str, arrays: tuple[Array, ...], *options: Any) -> Any:
        return self.layers._run(getattr(self.layers._k, kernel), self.dtype, arrays, *options)


def embed_forward(m: Model, w: dict[str, Array], tokens: Array, /) -> Array:
    return m.layers._k.embedding(w["embed"], index_ids(tokens))  # (B, S, D)


def embed_backward(m: Model, dx: Array, tokens: Array, /) -> Array:
    """dembed (V, D): a token read twice gets both rows' gradients; needs no weight (fsdp gathers none)."""
    return m.run("embedding_backward", (dx,), tokens, m.config.vocab_size)


def block_forward(m: Model, w: dict[str, Array], x: Array, layer: int, split: Split = WHOLE, /) -> tuple[Array, dict]:
    """One block, ``x + attention(norm(x))`` then ``h + mlp(norm(h))``: its output and its tape."""
    lay, p, pre = m.layers, m.pass_(w), f"layers.{layer}."
    a = split.enter(lay._norm(x, p, pre + "attn_norm"), pre + "attention input")
    saved = {"x": x, "a": a}
    h = x + split.leave(lay._attention(a, p, layer, saved), pre + "attention output")
    mm = split.enter(lay._norm(h, p, pre + "mlp_norm"), pre + "mlp input")
    saved.update(h=h, m=mm)
    return h + split.leave(lay._mlp(mm, p, layer), pre + "mlp output"), saved


def block_backward(
    m: Model,
    w: dict[str, Array],
    dout: Array,
    layer: int,
    saved: dict,
    grads: dict,
    split: Split = WHOLE,
    /,
    deferred: Deferred | None = None,
) -> Array:
    """`tensorglot.training`'s block backward with the split's collectives between its halves: dx.
    With ``deferred`` it is ZB-H1's B: the linears' weight gradients are left there for `weight_backward`
    (the norms' are computed here: they are small and read what B has at hand)."""
    lay, p, pre, eps = m.layers, m.pass_(w), f"layers.{layer}.", m.config.norm_eps
    dm = _mlp_backward(lay, split.leave_grad(dout, pre + "mlp output grad"), p, layer, saved, grads, deferred)
    dm = split.enter_grad(dm, pre + "mlp input grad")
    dh_norm, grads[pre + "mlp_norm"] = m.run("rms_norm_backward", (saved["h"], w[pre + "mlp_norm"], dm), eps)
    dh = dout + dh_norm
    da = split.leave_grad(dh, pre + "attention output grad")
    da = _attention_backward(lay, da, p, layer, saved, grads, deferred)
    da = split.enter_grad(da, pre + "attention input grad")
    dx_norm, grads[pre + "attn_norm"] = m.run("rms_norm_backward", (saved["x"], w[pre + "attn_norm"], da), eps)
    return dh + dx_norm


def head_forward(m: Model, w: dict[str, Array], x: Array, targets: Array, /) -> tuple[Array, tuple]:
    """The mean cross-entropy of ``targets`` under ``norm(x) @ head`` (a 0-d array) and the head's tape."""
    lay, p = m.layers, m.pass_(w)
    n = lay._norm(x, p, "norm")
    logits = lay._linear(n, _head(w, m.config), None, p)  # (B, S, V)
    return m.run("cross_entropy", (logits,), targets), (x, n, logits)


def head_backward(
    m: Model,
    w: dict[str, Array],
    saved: tuple,
    targets: Array,
    dloss: float,
    grads: dict,
    /,
    deferred: Deferred | None = None,
) -> Array:
    """Back from ``dloss`` (the weight of this piece's mean in the step's loss) to dx; the head's
    gradients go to ``grads`` (tied: ``embed`` gets dhead.T, to be added to the embedding's). With
    ``deferred`` (ZB-H1's B, untied) the output projection's is left there for `weight_backward`."""
    x, n, logits = saved
    d = m.xp.full((), dloss, dtype=logits.dtype, device=device(logits))
    dlogits = m.run("cross_entropy_backward", (logits, d), targets)
    head = _head(w, m.config)
    if deferred is not None:
        deferred.append(("lm_head", n, dlogits, tuple(head.shape)))
        dn = m.run("linear", (dlogits, head.T, None))
        dx, grads["norm"] = m.run("rms_norm_backward", (x, w["norm"], dn), m.config.norm_eps)
        return dx
    dn, dhead, _ = m.run("linear_backward", (n, head, dlogits), False)
    dx, grads["norm"] = m.run("rms_norm_backward", (x, w["norm"], dn), m.config.norm_eps)
    if m.config.tie_embeddings:
        grads["embed"] = dhead.T
    else:
        grads["lm_head"] = dhead
    return dx


def weight_backward(m: Model, deferred: Deferred, grads: dict, /) -> None:
    """ZB-H1's W: the weight gradients a B pass left in ``deferred``, into ``grads``."""
    _weight_grads(m.layers, m.dtype, deferred, grads)
