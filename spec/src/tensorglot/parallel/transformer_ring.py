"""Context parallel: ring attention over sequence shards (Liu et al., arXiv:2310.01889), causal load
balanced, with the log-sum-exp merge of the flash kernel.

The sequence is cut into 2n chunks and rank r holds chunks r and 2n−1−r (a head and a tail), so every
rank sees as many visible (query, key) pairs under the causal mask. Everything but attention is
position-wise and runs on the rank's 2·S/(2n) tokens with replicated weights (RoPE at their true
positions); the weights' gradients are all-reduced as each unit's backward ends, as in dp.

Attention itself is the ring: each rank keeps its queries, and the K/V blocks travel r → r+1 for n−1
steps; a block's scores are masked by the true positions (query i sees key j iff j <= i), and each
block's softmax is merged into the running output through its log-sum-exp. The backward walks the ring
again with the forward's output and log-sum-exp (kept as a flash kernel's tape would be): the K/V block
travels with its dK/dV accumulators, which a last send takes home.

It plugs into the same block code as every strategy: `ring_layers` is the backend's layers with its
``attention`` and ``attention_backward`` kernels swapped for the ring's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .collectives import Collectives
from .transformer_blocks import WHOLE, Model
from .transformer_shards import take

if TYPE_CHECKING:
    from .transformer import TransformerPieces
    from .transformer_rank import _Rank

Array = Any


def cp_positions(seq: int, n: int, rank: int, /) -> np.ndarray:
    """The positions rank ``rank`` of n holds: chunk r and chunk 2n−1−r of 2n.

    >>> cp_positions(8, 2, 0).tolist(), cp_positions(8, 2, 1).tolist()
    ([0, 1, 6, 7], [2, 3, 4, 5])
    """
    c = seq // (2 * n)
    return np.concatenate([np.arange(rank * c, (rank + 1) * c), np.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])


class Ring:
    """Ring attention on one rank: ``forward`` and ``backward`` with the kernels' signatures' arrays."""

    def __init__(self, comm: Collectives, positions: Array, xp: Any) -> None:
        self.comm, self.pos, self.xp = comm, positions, xp  # (n, S/n): every rank's positions
        self.tape: dict[int, tuple[Array, Array]] = {}  # id(q) -> (output, lse), for the backward

    def _scores(self, qg: Array, k: Array, src: int, scale: float) -> tuple[Array, Array]:
        """(masked scores (B, K, G, Sq, Sk), k as (B, K, 1, Sk, H)) of this rank's queries on rank src's keys."""
        xp = self.xp
        kh = xp.permute_dims(k, (0, 2, 1, 3))[:, :, None]  # (B, K, 1, Sk, H)
        s = (qg @ xp.matrix_transpose(kh)) * scale
        n = self.comm.world_size
        mine, theirs = take(self.pos, (0, self.comm.rank, n))[0], take(self.pos, (0, src, n))[0]
        seen = mine[:, None] >= theirs[None, :]  # (Sq, Sk), causal by position
        return xp.where(seen, s, -xp.inf), kh

    def _pass_on(self, tensors: list[Array], names: list[str], step: int) -> list[Array]:
        """Send ``tensors`` to the next rank, receive the previous rank's."""
        return [self.comm.shift(t, tensor=f"ring {name} step {step}") for t, name in zip(tensors, names)]

    def forward(self, q: Array, k: Array, v: Array, scale: float) -> Array:
        xp, n, r = self.xp, self.comm.world_size, self.comm.rank
        B, Sq, N, H = q.shape
        K = k.shape[2]
        qg = xp.reshape(xp.permute_dims(q, (0, 2, 1, 3)), (B, K, N // K, Sq, H))  # (B, K, G, Sq, H)
        out = lse = None
        for step in range(n):
            s, _ = self._scores(qg, k, (r - step) % n, scale)
            top = xp.max(s, axis=-1, keepdims=True)
            top = xp.where(xp.isinf(top), 0.0, top)  # a query that sees none of this block
            total = xp.sum(xp.exp(s - top), axis=-1)
            block = xp.where(total > 0, xp.log(xp.where(total > 0, total, 1.0)) + top[..., 0], -xp.inf)
            new = block if lse is None else xp.logaddexp(lse, block)  # finite: step 0 holds the diagonal
            vh = xp.permute_dims(v, (0, 2, 1, 3))[:, :, None]  # (B, K, 1, Sk, H)
            part = xp.exp(s - new[..., None]) @ vh
            out = part if out is None else out * xp.exp(lse - new)[..., None] + part
            lse = new
            if step < n - 1:
                k, v = self._pass_on([k, v], ["k", "v"], step)
        self.tape[id(q)] = (out, lse)
        return xp.permute_dims(xp.reshape(out, (B, N, Sq, H)), (0, 2, 1, 3))  # (B, S, N, H)

    def backward(self, q: Array, k: Array, v: Array, dy: Array, scale: float) -> tuple[Array, Array, Array]:
        xp, n, r = self.xp, self.comm.world_size, self.comm.rank
        out, lse = self.tape.pop(id(q))
        B, Sq, N, H = q.shape
        K = k.shape[2]
        G = N // K
        qg = xp.reshape(xp.permute_dims(q, (0, 2, 1, 3)), (B, K, G, Sq, H))
        dyg = xp.reshape(xp.permute_dims(dy, (0, 2, 1, 3)), (B, K, G, Sq, H))
        rowdot = xp.sum(dyg * out, axis=-1, keepdims=True)  # (B, K, G, Sq, 1)
        dq = xp.zeros_like(qg)
        dk, dv = xp.zeros_like(k), xp.zeros_like(v)  # (B, Sk, K, H): they travel with their block
        for step in range(n):
            s, kh = self._scores(qg, k, (r - step) % n, scale)
            p = xp.exp(s - lse[..., None])  # (B, K, G, Sq, Sk), 0 where masked
            vh = xp.permute_dims(v, (0, 2, 1, 3))[:, :, None]
            ds = p * (dyg @ xp.matrix_transpose(vh) - rowdot)
            dq = dq + (ds @ kh) * scale
            dk = dk + xp.permute_dims(xp.sum(xp.matrix_transpose(ds) @ qg, axis=2) * scale, (0, 2, 1, 3))
            dv = dv + xp.permute_dims(xp.sum(xp.matrix_transpose(p) @ dyg, axis=2), (0, 2, 1, 3))
            if step < n - 1:
                k, v, dk, dv = self._pass_on([k, v, dk, dv], ["k", "v", "dk", "dv"], step)
            elif n > 1:  # this block's owner is the next rank: send its gradients home
                dk, dv = self._pass_on([dk, dv], ["dk", "dv"], step)
        return xp.permute_dims(xp.reshape(dq, (B, N, Sq, H)), (0, 2, 1, 3)), dk, dv


class _RingKernels:
    """A backend's kernels with attention and its backward done by a `Ring`."""

    def __init__(self, kernels: Any, ring: Ring) -> None:
        self._kernels, self._ring = kernels, ring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernels, name)

    def attention(self, q: Array, k: Array, v: Array, causal: bool, mask: Any, scale: float) -> Array:
        return self._ring.forward(q, k, v, scale)

    def attention_backward(self, q: Array, k: Array, v: Array, dy: Array, causal: bool, mask: Any, scale: float):
        return self._ring.backward(q, k, v, dy, scale)


def ring_layers(layers: Any, ring: Ring, /) -> Any:
    """``layers`` whose attention kernels are the ring's (the rest untouched)."""
    out = object.__new__(type(layers))  # not copy.copy: a front end pickles (and copies) by name, as itself
    out.__dict__.update(vars(layers), _k=_RingKernels(layers._k, ring))
    return out


def cp_rank(rk: _Rank, /) -> TransformerPieces:
    """Context parallel on one rank: its head and tail chunks of every sequence, ring attention, and
    every weight's gradient all-reduced when its unit's backward ends."""
    comm, n, r, xp = rk.comm, rk.n, rk.r, rk.xp
    S = rk.tokens.shape[1]
    positions = rk.native(np.stack([cp_positions(S, n, i) for i in range(n)]))  # (n, S/n)
    mine = take(positions, (0, r, n))[0]
    ring = Ring(comm, positions, xp)
    model = Model(ring_layers(rk.layers, ring), rk.config, rk.step.dtype, xp, mine)

    def done(names: list[str], g: dict[str, Array]) -> None:
        for k in names:
            g[k] = comm.all_reduce(g[k], tensor=f"{k} grad")

    tok, tgt = (xp.take(t, mine, axis=1) for t in (rk.tokens, rk.targets))  # (B, S/n)
    loss, g = rk.walk(lambda names, phase: rk.params, tok, tgt, 1.0 / n, WHOLE, done, model)
    return rk.pieces(loss / n, {k: (g[k], None) for k in rk.params}, {k: (v, None) for k, v in rk.params.items()})


def cp_ring_bytes(batch: int, seq: int, kv_heads: int, head_dim: int, n: int, itemsize: int, /) -> int:
    """One K (or V) block's bytes: B · S/n · K · H."""
    return math.prod((batch, seq // n, kv_heads, head_dim)) * itemsize
