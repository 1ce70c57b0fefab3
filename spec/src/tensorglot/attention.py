"""The attention ops of the spec: scaled dot-product attention with GQA, its blockwise (flash) form and
the bool masks. Part of `tensorglot.ops.Ops` (``be.ops``); each function is validated here and computed by
the backend's kernel of the same name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from . import checks
from .frontend import FrontEnd, shape

Array = Any


class AttentionOps(FrontEnd):
    def attention(
        self,
        q: Array,
        k: Array,
        v: Array,
        /,
        *,
        causal: bool = False,
        mask: Array | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ) -> Array:
        r"""Scaled dot-product attention with grouped KV heads: ``softmax(q kᵀ · scale + bias) v``.

        Conventions (pinned):
          * GQA: query head ``h`` reads kv head ``h // (N // K)``; N % K must be 0 (K = 1 is MQA).
          * ``scale`` defaults to 1/√H.
          * ``causal`` is bottom-right aligned: query i sees key j iff ``j <= i + T - S``, so the last
            query sees every key — what decoding with a cache of T − S earlier keys needs.
            ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` is top-left aligned;
            the two agree only when S == T.
          * ``mask`` is bool, True = attend, broadcastable to (B, N, S, T); it combines with ``causal``
            (and ``window``) by logical and.
          * ``softcap`` (Gemma 2): the scaled logits s become ``softcap · tanh(s / softcap)`` before any
            masking, so every logit lies in (−softcap, softcap) and keeps its order.
          * ``window`` W (Mistral, Gemma 2's local layers; needs ``causal``): a sliding window in the
            same bottom-right positions, query i sees key j iff ``i + T − S − W < j ≤ i + T − S`` — its own
            position and the W − 1 before it. W ≥ T is plain causal attention, W = 1 the diagonal alone.
          * A query that can see no key outputs zeros (and passes no gradient); so T = 0 gives zeros, and
            S = 0 an empty (B, 0, N, H) output; H = 0 an empty (B, S, N, 0) one.
          * A key that no query of its sequence sees (through ``mask`` and ``causal``: padding, an
            unwritten cache slot) may hold anything, NaN and inf included: it reaches no output and no
            gradient (the front end zeroes it with ``where`` before the kernel).

        Args:
            q: (B, S, N, H).  k, v: (B, T, K, H).  softcap: > 0 or None.  window: an int ≥ 1 or None.
        Returns:
            (B, S, N, H).

        Reference: Vaswani et al. 2017 (arXiv:1706.03762); GQA, Ainslie et al. 2023 (arXiv:2305.13245);
        softcapping, Gemma Team 2024 (arXiv:2408.00118); sliding windows, Beltagy et al. 2020
        (arXiv:2004.05150) and Jiang et al. 2023 (arXiv:2310.06825).

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 2, 1, 1)); k = np.zeros((1, 2, 1, 1)); v = np.array([1.0, 3.0]).reshape(1, 2, 1, 1)
        >>> print(ops.attention(q, k, v, causal=True).ravel())
        [1. 2.]
        >>> print(ops.attention(q, k, v, causal=True, window=1).ravel())
        [1. 3.]
        """
        (q, k, v), dtype, *options = self._attention_inputs(
            "attention", q, k, v, None, causal, mask, scale, softcap, window
        )
        return self._run(self._k.attention, dtype, (q, k, v), *options)

    def attention_backward(
        self,
        q: Array,
        k: Array,
        v: Array,
        dy: Array,
        /,
        *,
        causal: bool = False,
        mask: Array | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ) -> tuple[Array, Array, Array]:
        r"""``(dq, dk, dv)`` of `attention`. With P the attention probabilities and dP = dy vᵀ:
        ``dv = Pᵀ dy``, ``dS = P ⊙ (dP − rowsum(dP ⊙ P))``, ``dq = dS k · scale``, ``dk = dSᵀ q · scale``;
        the kv gradients sum over the N // K query heads that share each kv head. With ``softcap`` dS is
        first multiplied by the cap's derivative ``1 − tanh²(s / softcap)``.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 2, 1, 1)); k = np.zeros((1, 2, 1, 1)); v = np.ones((1, 2, 1, 1))
        >>> dq, dk, dv = ops.attention_backward(q, k, v, np.ones((1, 2, 1, 1)), causal=True)
        >>> print(dv.ravel())
        [1.5 0.5]
        """
        fn = "attention_backward"
        arrays, dtype, *options = self._attention_inputs(fn, q, k, v, dy, causal, mask, scale, softcap, window)
        return self._run(self._k.attention_backward, dtype, arrays, *options)

    def flash_attention(
        self,
        q: Array,
        k: Array,
        v: Array,
        /,
        *,
        causal: bool = False,
        mask: Array | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
        block_size: int = 128,
    ) -> Array:
        r"""`attention`, computed blockwise without the S × T score matrix (FlashAttention-2's forward).

        Needs the ``"flash"`` capability. The result equals `attention`'s with the same arguments (up to
        rounding: the sums run in another order); every convention is `attention`'s — GQA, scale 1/√H,
        bottom-right causal, bool mask, a query that sees no key outputs zeros.

        The algorithm: queries and keys are cut into tiles of ``block_size`` rows (the last tile may be
        shorter). For a query tile Q_i, with a running row max m, row sum ℓ and accumulator A all
        starting empty (m = −∞, ℓ = 0, A = 0), each key tile j does

            S_ij = Q_i K_jᵀ · scale  (−∞ where masked),   m' = max(m, rowmax(S_ij)),
            P_ij = exp(S_ij − m'),   ℓ ← e^{m − m'} ℓ + rowsum(P_ij),   A ← e^{m − m'} A + P_ij V_j,   m ← m'

        and the tile's output is ``A / ℓ`` (zeros where ℓ = 0). Only O(block_size²) scores exist at a
        time; the forward keeps the output and the log-sum-exp ``L = m + log ℓ`` per query for the
        backward (`flash_attention_backward`). With ``causal``, key tiles that no query of the tile can
        see are skipped, which halves the work at S = T; with ``window`` W the tiles wholly before the
        window are skipped too, so the work grows as S·W instead of S·T. ``softcap`` caps each tile's
        scores before the mask.

        Args:
            q: (B, S, N, H).  k, v: (B, T, K, H).  mask: bool, broadcastable to (B, N, S, T).
            block_size: rows per tile (queries and keys), a positive int; it need not divide S or T.
        Returns:
            (B, S, N, H), q's dtype.

        Reference: Dao 2023, FlashAttention-2 (arXiv:2307.08691), Algorithm 1; Milakov & Gimelshein 2018
        (arXiv:1805.02867) for the online softmax.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 3, 1, 1)); k = np.zeros((1, 3, 1, 1)); v = np.array([1.0, 3.0, 5.0]).reshape(1, 3, 1, 1)
        >>> print(ops.flash_attention(q, k, v, causal=True, block_size=2).ravel())
        [1. 2. 3.]
        """
        fn = "flash_attention"
        (q, k, v), dtype, causal, mask, scale, softcap, window = self._attention_inputs(
            fn, q, k, v, None, causal, mask, scale, softcap, window
        )
        block_size = self._index(fn, "block_size", block_size)
        return self._run(self._k.flash_attention, dtype, (q, k, v), causal, mask, scale, block_size, softcap, window)

    def flash_attention_backward(
        self,
        q: Array,
        k: Array,
        v: Array,
        dy: Array,
        /,
        *,
        causal: bool = False,
        mask: Array | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
        block_size: int = 128,
    ) -> tuple[Array, Array, Array]:
        r"""``(dq, dk, dv)`` of `flash_attention` (= `attention_backward`'s), recomputing the tiles.

        Needs the ``"flash"`` capability. From the forward's output O and log-sum-exp L, with
        ``D = rowsum(dy ⊙ O)``, each pair of tiles recomputes ``P_ij = exp(Q_i K_jᵀ · scale − L_i)``
        (0 where masked or where the query sees no key) and adds

            dV_j += P_ijᵀ dY_i,   dS_ij = P_ij ⊙ (dY_i V_jᵀ − D_i),   dQ_i += dS_ij K_j · scale,
            dK_j += dS_ijᵀ Q_i · scale

        (Dao 2023, Algorithm 2), dS times ``1 − tanh²(s / softcap)`` with ``softcap``; the kv gradients
        sum over the N // K query heads that share a kv head. Tiles the causal mask or the window hides
        are skipped as in the forward.
        A standalone call runs the forward first to get O and L; the autograd backends' backward pass
        reuses the ones its forward saved.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 2, 1, 1)); k = np.zeros((1, 2, 1, 1)); v = np.ones((1, 2, 1, 1))
        >>> dq, dk, dv = ops.flash_attention_backward(q, k, v, np.ones((1, 2, 1, 1)), causal=True, block_size=1)
        >>> print(dv.ravel())
        [1.5 0.5]
        """
        fn = "flash_attention_backward"
        arrays, dtype, causal, mask, scale, softcap, window = self._attention_inputs(
            fn, q, k, v, dy, causal, mask, scale, softcap, window
        )
        block_size = self._index(fn, "block_size", block_size)
        kernel = self._k.flash_attention_backward
        return self._run(kernel, dtype, arrays, causal, mask, scale, block_size, softcap, window)

    def causal_mask(self, s: int, t: int, /, *, window: int | None = None) -> Array:
        r"""The bottom-right aligned causal mask, bool (S, T): ``mask[i, j] = j <= i + t - s``, and with a
        sliding ``window`` W also ``j > i + t - s - W`` (what `attention`'s ``window`` attends to).

        >>> import tensorglot
        >>> print(tensorglot.get_backend("numpy").ops.causal_mask(2, 3).astype(int))
        [[1 1 0]
         [1 1 1]]
        >>> print(tensorglot.get_backend("numpy").ops.causal_mask(2, 3, window=2).astype(int))
        [[1 1 0]
         [0 1 1]]
        """
        s = self._index("causal_mask", "s", s, allow_zero=True)
        t = self._index("causal_mask", "t", t, allow_zero=True)
        # Bottom-right: query i sees keys j <= i + t - s, so the last query sees all t keys.
        diagonal = np.arange(s)[:, None] + (t - s)  # (S, 1)
        keys = np.arange(t)[None, :]  # (1, T)
        mask = keys <= diagonal
        if window is not None:
            mask &= keys > diagonal - self._index("causal_mask", "window", window)
        return self._be.asarray(mask, "bool")  # (S, T)

    def padding_mask(self, lengths: Array, t: int, /) -> Array:
        r"""Bool (B, 1, 1, T), True for the first ``lengths[b]`` keys of sequence b (right padding);
        it broadcasts against (B, N, S, T) in `attention`.

        >>> import numpy as np, tensorglot
        >>> m = tensorglot.get_backend("numpy").ops.padding_mask(np.array([1, 3]), 3)
        >>> print(m.shape, m[:, 0, 0].astype(int).tolist())
        (2, 1, 1, 3) [[1, 0, 0], [1, 1, 1]]
        """
        fn = "padding_mask"
        lengths = self._int(fn, "lengths", lengths)
        checks.check_rank(fn, "lengths", shape(lengths), "(B)")
        t = self._index(fn, "t", t, allow_zero=True)
        xp = array_namespace(lengths)
        if not self._be.is_traced(lengths) and lengths.shape[0]:
            lo, hi = int(xp.min(lengths)), int(xp.max(lengths))
            if lo < 0 or hi > t:
                raise ValueError(f"{fn}: lengths must lie in [0, {t}], got min {lo} max {hi}")
        keys = xp.arange(t, device=device(lengths))
        return (keys[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)

    def _attention_inputs(self, fn, q, k, v, dy, causal, mask, scale, softcap, window):
        """The validated arrays (q, k, v[, dy]), their dtype, and the options as the kernels take them:
        causal, mask, scale, softcap, window."""
        arrays, dtype = self._floats(fn, q=q, k=k, v=v, **({} if dy is None else {"dy": dy}))
        q, k, v = arrays[:3]
        if mask is not None:
            mask = self._bool(fn, "mask", mask)
            self._same_device(fn, {"q": q, "mask": mask})
        scale = None if scale is None else self._static(fn, "scale", scale)
        *_, H = checks.attention(fn, shape(q), shape(k), shape(v), None if mask is None else shape(mask), scale)
        if dy is not None:
            checks.check_same_shape(fn, "dy", shape(arrays[3]), shape(q), "q")
        causal = self._bool_option(fn, "causal", causal)
        if mask is not None:
            if len(mask.shape) < 4:
                mask = mask[(None,) * (4 - len(mask.shape)) + (...,)]  # (B|1, N|1, S|1, T|1), as kernels take it
            arrays[1], arrays[2] = _hide_unseen(arrays[1], arrays[2], mask, causal, shape(q)[1], shape(q)[2])
        if scale is None:
            scale = 1.0 / math.sqrt(H) if H else 1.0  # H = 0: no features, any scale gives the same zeros
        softcap = None if softcap is None else self._positive(fn, "softcap", softcap)
        if window is not None:
            window = self._index(fn, "window", window)
            if not causal:
                raise ValueError(f"{fn}: window counts back from each query's causal diagonal, so it needs causal=True")
        return arrays, dtype, causal, mask, float(scale), softcap, window


def _hide_unseen(k: Array, v: Array, mask: Array, causal: bool, S: int, N: int) -> tuple[Array, Array]:
    """k and v with zeros at the keys no query of their sequence and kv head sees.

    Such a key (padding, an unwritten slot) may hold anything, NaN and inf included; its probability is
    0, but 0 · NaN is NaN, so a kernel's products would carry it into every output and gradient. Selected
    away here, once for every kernel, with ``where`` (never a multiplication by zero); a key some query
    sees keeps its value.
    """
    xp = array_namespace(k)
    T, K = shape(k)[1], shape(k)[2]
    seen = mask  # (B|1, N|1, S|1, T|1)
    if causal:
        keys, rows = xp.arange(T, device=device(k)), xp.arange(S, device=device(k))
        seen = xp.logical_and(seen, (keys[None, :] <= rows[:, None] + (T - S))[None, None, ...])  # (B|1, N|1, S, T)
    seen = xp.any(seen, axis=2)  # (B|1, N|1, T|1): some query sees the key
    b, n, t = shape(seen)
    if n != 1:
        seen = xp.any(xp.reshape(seen, (b, K, N // K, t)), axis=2)  # (B|1, K, T|1): query head h reads h // G
    seen = xp.permute_dims(seen, (0, 2, 1))[..., None]  # (B|1, T|1, K|1, 1), against (B, T, K, H)
    return xp.where(seen, k, xp.zeros_like(k)), xp.where(seen, v, xp.zeros_like(v))


#: The blockwise attention pair: only backends that declare the ``"flash"`` capability provide them.
FLASH_NAMES = ("flash_attention", "flash_attention_backward")
