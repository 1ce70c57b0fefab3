"""The ops namespace: softmax, linear, MLPs, RMSNorm, attention, masks and their explicit VJPs.

Every backend's ``ops`` module provides these functions with these signatures (a conformance test
compares them). Arrays are positional-only, options keyword-only. Shapes: B batch, S query length,
T key length, N query heads, K key/value heads, H head dim, D model dim, F hidden dim.

Precision: float16 and bfloat16 inputs are computed in float32 inside and cast back; float32 stays
float32 and float64 stays float64 (the reference). Each ``*_backward`` is the vector-Jacobian product
that torch's ``autograd.Function.backward`` and jax's ``custom_vjp`` bwd implement too.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

Array = Any
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]


class Ops(Protocol):
    def softmax(self, x: Array, /, *, axis: int = -1) -> Array:
        r"""Softmax along ``axis``: ``exp(x - max(x)) / sum(exp(x - max(x)))``.

        The maximum is subtracted first, so large inputs never overflow. Special cases: a row that is
        all ``-inf`` (a query that may attend to nothing) gives zeros, not NaN — torch.softmax and
        jax.nn.softmax give NaN there, jax.nn.dot_product_attention a uniform row; a NaN anywhere in a row
        makes that row NaN. An empty axis gives an empty result.

        Args:
            x: float array of any rank.
            axis: the axis to normalise over; negative counts from the end.
        Returns:
            an array of x's shape and dtype whose slices along ``axis`` sum to 1 (or are all 0).

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(np.round(ops.softmax(np.array([1.0, 2.0, 3.0])), 4))
        [0.09   0.2447 0.6652]
        >>> print(ops.softmax(np.array([-np.inf, -np.inf])))
        [0. 0.]
        """
        ...

    def softmax_backward(self, y: Array, dy: Array, /, *, axis: int = -1) -> Array:
        r"""The VJP of softmax from its output: ``dx = y * (dy - sum(dy * y, axis))``.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> y = ops.softmax(np.array([0.0, 0.0]))
        >>> print(ops.softmax_backward(y, np.array([1.0, 0.0])))
        [ 0.25 -0.25]
        """
        ...

    def linear(self, x: Array, w: Array, b: Array | None = None, /) -> Array:
        r"""``x @ w + b`` with ``w`` stored (in, out), as in JAX/Flax (torch's nn.Linear stores (out, in)).

        Args:
            x: (..., in).  w: (in, out).  b: (out,) or None.
        Returns:
            (..., out).

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(ops.linear(np.array([[1.0, 2.0]]), np.array([[1.0], [1.0]]), np.array([0.5])))
        [[3.5]]
        """
        ...

    def linear_backward(self, x: Array, w: Array, dy: Array, /, *, bias: bool) -> tuple[Array, Array, Array | None]:
        r"""``(dx, dw, db)`` = ``(dy @ wᵀ, xᵀ @ dy, sum(dy))``, summed over all leading axes; db is None
        unless ``bias``.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> dx, dw, db = ops.linear_backward(np.ones((1, 2)), np.ones((2, 3)), np.ones((1, 3)), bias=True)
        >>> print(dx, dw.shape, db)
        [[3. 3.]] (2, 3) [1. 1. 1.]
        """
        ...

    def mlp(self, x: Array, w_in: Array, w_out: Array, /, *, activation: Activation = "relu") -> Array:
        r"""``act(x @ w_in) @ w_out``, no biases.

        Activations: ``relu`` max(z, 0) (its derivative at 0 is taken as 0); ``gelu`` z·Φ(z) with the
        exact erf; ``gelu_tanh`` 0.5·z·(1 + tanh(√(2/π)(z + 0.044715 z³))) (GPT-2); ``silu`` z·σ(z).

        Args:
            x: (..., D).  w_in: (D, F).  w_out: (F, D).
        Returns:
            (..., D).

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(ops.mlp(np.array([[1.0, -1.0]]), np.eye(2), np.eye(2)))
        [[1. 0.]]
        """
        ...

    def mlp_backward(
        self, x: Array, w_in: Array, w_out: Array, dy: Array, /, *, activation: Activation = "relu"
    ) -> tuple[Array, Array, Array]:
        r"""``(dx, dw_in, dw_out)`` of `mlp`; the pre-activation is recomputed from x.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> dx, dw_in, dw_out = ops.mlp_backward(np.array([[1.0, -1.0]]), np.eye(2), np.eye(2), np.ones((1, 2)))
        >>> print(dx)
        [[1. 0.]]
        """
        ...

    def swiglu(self, x: Array, w_gate: Array, w_up: Array, w_down: Array, /) -> Array:
        r"""The gated MLP of Llama: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` (Shazeer 2020,
        arXiv:2002.05202).

        Args:
            x: (..., D).  w_gate, w_up: (D, F).  w_down: (F, D).
        Returns:
            (..., D).

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(np.round(ops.swiglu(np.array([[1.0]]), np.eye(1), np.eye(1), np.eye(1)), 4))
        [[0.7311]]
        """
        ...

    def swiglu_backward(
        self, x: Array, w_gate: Array, w_up: Array, w_down: Array, dy: Array, /
    ) -> tuple[Array, Array, Array, Array]:
        r"""``(dx, dw_gate, dw_up, dw_down)`` of `swiglu`.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> grads = ops.swiglu_backward(np.ones((1, 1)), np.eye(1), np.eye(1), np.eye(1), np.ones((1, 1)))
        >>> print([np.round(g, 4).item() for g in grads])
        [1.6587, 0.9277, 0.7311, 0.7311]
        """
        ...

    def rms_norm(self, x: Array, weight: Array, /, *, eps: float = 1e-6) -> Array:
        r"""``x * rsqrt(mean(x², -1) + eps)`` then ``* weight`` (Zhang & Sennrich 2019, arXiv:1910.07467).

        Cast order (Llama's, pinned): the normalisation runs in float32 (float64 for float64 input),
        the normalised x is cast back to x.dtype, and only then multiplied by ``weight``.

        Args:
            x: (..., D).  weight: (D,).  eps: > 0.
        Returns:
            x's shape and dtype.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(np.round(ops.rms_norm(np.array([3.0, 4.0]), np.ones(2), eps=1e-12), 4))
        [0.8485 1.1314]
        """
        ...

    def rms_norm_backward(self, x: Array, weight: Array, dy: Array, /, *, eps: float = 1e-6) -> tuple[Array, Array]:
        r"""``(dx, dweight)``: with r = rsqrt(mean(x²) + eps), n = x·r and g = dy·weight,
        ``dx = r · (g − n · mean(g·n))`` and ``dweight = sum(dy · n)`` over all leading axes.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> dx, dw = ops.rms_norm_backward(np.array([[3.0, 4.0]]), np.ones(2), np.array([[1.0, 0.0]]))
        >>> print(np.round(dx, 4), np.round(dw, 4))
        [[ 0.181  -0.1358]] [0.8485 0.    ]
        """
        ...

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
            by logical and.
          * A query that can see no key outputs zeros (and passes no gradient).

        Args:
            q: (B, S, N, H).  k, v: (B, T, K, H).
        Returns:
            (B, S, N, H).

        Reference: Vaswani et al. 2017 (arXiv:1706.03762); GQA, Ainslie et al. 2023 (arXiv:2305.13245).

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 2, 1, 1)); k = np.zeros((1, 2, 1, 1)); v = np.array([1.0, 3.0]).reshape(1, 2, 1, 1)
        >>> print(ops.attention(q, k, v, causal=True).ravel())
        [1. 2.]
        """
        ...

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
    ) -> tuple[Array, Array, Array]:
        r"""``(dq, dk, dv)`` of `attention`. With P the attention probabilities and dP = dy vᵀ:
        ``dv = Pᵀ dy``, ``dS = P ⊙ (dP − rowsum(dP ⊙ P))``, ``dq = dS k · scale``, ``dk = dSᵀ q · scale``;
        the kv gradients sum over the N // K query heads that share each kv head.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 2, 1, 1)); k = np.zeros((1, 2, 1, 1)); v = np.ones((1, 2, 1, 1))
        >>> dq, dk, dv = ops.attention_backward(q, k, v, np.ones((1, 2, 1, 1)), causal=True)
        >>> print(dv.ravel())
        [1.5 0.5]
        """
        ...

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
        see are skipped, which halves the work at S = T.

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
        ...

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
        block_size: int = 128,
    ) -> tuple[Array, Array, Array]:
        r"""``(dq, dk, dv)`` of `flash_attention` (= `attention_backward`'s), recomputing the tiles.

        Needs the ``"flash"`` capability. From the forward's output O and log-sum-exp L, with
        ``D = rowsum(dy ⊙ O)``, each pair of tiles recomputes ``P_ij = exp(Q_i K_jᵀ · scale − L_i)``
        (0 where masked or where the query sees no key) and adds

            dV_j += P_ijᵀ dY_i,   dS_ij = P_ij ⊙ (dY_i V_jᵀ − D_i),   dQ_i += dS_ij K_j · scale,
            dK_j += dS_ijᵀ Q_i · scale

        (Dao 2023, Algorithm 2); the kv gradients sum over the N // K query heads that share a kv head.
        A standalone call runs the forward first to get O and L; the autograd backends' backward pass
        reuses the ones its forward saved.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> q = np.zeros((1, 2, 1, 1)); k = np.zeros((1, 2, 1, 1)); v = np.ones((1, 2, 1, 1))
        >>> dq, dk, dv = ops.flash_attention_backward(q, k, v, np.ones((1, 2, 1, 1)), causal=True, block_size=1)
        >>> print(dv.ravel())
        [1.5 0.5]
        """
        ...

    def causal_mask(self, s: int, t: int, /) -> Array:
        r"""The bottom-right aligned causal mask, bool (S, T): ``mask[i, j] = j <= i + t - s``.

        >>> import tensorglot
        >>> print(tensorglot.get_backend("numpy").ops.causal_mask(2, 3).astype(int))
        [[1 1 0]
         [1 1 1]]
        """
        ...

    def padding_mask(self, lengths: Array, t: int, /) -> Array:
        r"""Bool (B, 1, 1, T), True for the first ``lengths[b]`` keys of sequence b (right padding);
        it broadcasts against (B, N, S, T) in `attention`.

        >>> import numpy as np, tensorglot
        >>> m = tensorglot.get_backend("numpy").ops.padding_mask(np.array([1, 3]), 3)
        >>> print(m.shape, m[:, 0, 0].astype(int).tolist())
        (2, 1, 1, 3) [[1, 0, 0], [1, 1, 1]]
        """
        ...


#: The blockwise attention pair: only backends that declare the ``"flash"`` capability provide them.
FLASH_NAMES = ("flash_attention", "flash_attention_backward")

#: The public names every backend provides, in the order the docs list them.
NAMES = tuple(n for n in Ops.__dict__ if not n.startswith("_") and n not in FLASH_NAMES)
