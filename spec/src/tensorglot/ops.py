"""The ops namespace: softmax, linear, MLPs (plain, SwiGLU, GeGLU), the norms, attention, masks, their VJPs.

Each function is written once, here: the front end of `tensorglot.frontend` validates, converts
and casts, then calls the backend's kernel of the same name (`tensorglot.kernels`), so ``be.ops`` of
every backend is an `Ops` bound to it. Arrays are positional-only, options keyword-only. Shapes: B batch,
S query length, T key length, N query heads, K key/value heads, H head dim, D model dim, F hidden dim.

Precision: float16 and bfloat16 inputs are computed in float32 inside and cast back; float32 stays
float32 and float64 stays float64 (the reference). Each ``*_backward`` is the vector-Jacobian product
that torch's ``autograd.Function.backward`` and jax's ``custom_vjp`` bwd implement too.
"""

from __future__ import annotations

from typing import Any, Literal

from . import checks
from .attention import FLASH_NAMES as FLASH_NAMES
from .attention import AttentionOps
from .frontend import HALF, shape
from .kernels import GATES

Array = Any
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]


class Ops(AttentionOps):
    """The ops of one backend: ``Ops(backend)`` is ``backend.ops``."""

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
        fn = "softmax"
        x, dtype = self._float(fn, "x", x)
        axis = self._axis(fn, axis, len(x.shape))
        if x.shape[axis] == 0:
            return x
        return self._run(self._k.softmax, dtype, (x,), axis)

    def softmax_backward(self, y: Array, dy: Array, /, *, axis: int = -1) -> Array:
        r"""The VJP of softmax from its output: ``dx = y * (dy - sum(dy * y, axis))``.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> y = ops.softmax(np.array([0.0, 0.0]))
        >>> print(ops.softmax_backward(y, np.array([1.0, 0.0])))
        [ 0.25 -0.25]
        """
        fn = "softmax_backward"
        (y, dy), dtype = self._floats(fn, y=y, dy=dy)
        checks.check_same_shape(fn, "dy", shape(dy), shape(y), "y")
        axis = self._axis(fn, axis, len(y.shape))
        return self._run(self._k.softmax_backward, dtype, (y, dy), axis)

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
        fn = "linear"
        (x, w, b), dtype = self._floats(fn, x=x, w=w, b=b)
        checks.linear(fn, shape(x), shape(w), None if b is None else shape(b))
        return self._run(self._k.linear, dtype, (x, w, b))

    def linear_backward(self, x: Array, w: Array, dy: Array, /, *, bias: bool) -> tuple[Array, Array, Array | None]:
        r"""``(dx, dw, db)`` = ``(dy @ wᵀ, xᵀ @ dy, sum(dy))``, summed over all leading axes; db is None
        unless ``bias``.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> dx, dw, db = ops.linear_backward(np.ones((1, 2)), np.ones((2, 3)), np.ones((1, 3)), bias=True)
        >>> print(dx, dw.shape, db)
        [[3. 3.]] (2, 3) [1. 1. 1.]
        """
        fn = "linear_backward"
        (x, w, dy), dtype = self._floats(fn, x=x, w=w, dy=dy)
        checks.linear(fn, shape(x), shape(w), None)
        checks.check_same_shape(fn, "dy", shape(dy), (*shape(x)[:-1], shape(w)[1]), "linear's output")
        return self._run(self._k.linear_backward, dtype, (x, w, dy), self._bool_option(fn, "bias", bias))

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
        (x, w_in, w_out), dtype, activation = self._mlp_inputs("mlp", x, w_in, w_out, activation)
        return self._run(self._k.mlp, dtype, (x, w_in, w_out), activation)

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
        fn = "mlp_backward"
        (x, w_in, w_out, dy), dtype, activation = self._mlp_inputs(fn, x, w_in, w_out, activation, dy)
        return self._run(self._k.mlp_backward, dtype, (x, w_in, w_out, dy), activation)

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
        return self._gated("swiglu", x, w_gate, w_up, w_down)

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
        return self._gated("swiglu_backward", x, w_gate, w_up, w_down, dy)

    def geglu(self, x: Array, w_gate: Array, w_up: Array, w_down: Array, /) -> Array:
        r"""The gated MLP of Gemma: `swiglu` with the tanh-approximated GELU of `mlp` as its gate,
        ``(gelu_tanh(x @ w_gate) * (x @ w_up)) @ w_down`` (HF ``hidden_activation="gelu_pytorch_tanh"``);
        shapes as `swiglu`'s, x (..., D), w_gate and w_up (D, F), w_down (F, D), the result (..., D).

        >>> import numpy as np, tensorglot
        >>> ops, one = tensorglot.get_backend("numpy").ops, np.eye(1)
        >>> gated, plain = ops.geglu(one, one, one, one), ops.mlp(one, one, one, activation="gelu_tanh")
        >>> print(np.round(gated, 4), np.round(plain, 4))
        [[0.8412]] [[0.8412]]
        """
        return self._gated("geglu", x, w_gate, w_up, w_down)

    def geglu_backward(
        self, x: Array, w_gate: Array, w_up: Array, w_down: Array, dy: Array, /
    ) -> tuple[Array, Array, Array, Array]:
        r"""``(dx, dw_gate, dw_up, dw_down)`` of `geglu`: `swiglu_backward`'s formula with gelu_tanh's
        derivative in place of silu's.

        >>> import numpy as np, tensorglot
        >>> one = np.eye(1)
        >>> grads = tensorglot.get_backend("numpy").ops.geglu_backward(one, one, one, one, one)
        >>> print([np.round(g, 4).item() for g in grads])
        [1.9242, 1.083, 0.8412, 0.8412]
        """
        return self._gated("geglu_backward", x, w_gate, w_up, w_down, dy)

    def rms_norm(self, x: Array, weight: Array, /, *, eps: float = 1e-6, offset: float = 0.0) -> Array:
        r"""``x * rsqrt(mean(x², -1) + eps)`` then ``* (offset + weight)`` (Zhang & Sennrich 2019,
        arXiv:1910.07467). ``offset=1.0`` is Gemma's RMSNorm, whose weights are stored as ``w`` with
        ``1 + w`` applied (so a zero-initialised weight is the identity scale).

        Cast order (pinned, each as its family's Hugging Face code): the normalisation runs in float32
        (float64 for float64 input). With ``offset = 0`` (Llama's order) the normalised x is cast back to
        x.dtype and only then multiplied by ``weight``; with ``offset ≠ 0`` (Gemma's order, HF
        ``x_norm_fp32 * (1.0 + w.float())``) ``offset + weight`` and the product are computed in float32
        and only the result is cast back.

        Args:
            x: (..., D).  weight: (D,).  eps: > 0.  offset: a finite number added to the weight.
        Returns:
            x's shape and dtype.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(np.round(ops.rms_norm(np.array([3.0, 4.0]), np.ones(2), eps=1e-12), 4))
        [0.8485 1.1314]
        >>> print(np.round(ops.rms_norm(np.array([3.0, 4.0]), np.zeros(2), eps=1e-12, offset=1.0), 4))
        [0.8485 1.1314]
        """
        fn = "rms_norm"
        (x, weight), dtype = self._floats(fn, x=x, weight=weight)
        eps, offset = self._positive(fn, "eps", eps), self._finite(fn, "offset", offset)
        checks.rms_norm(fn, shape(x), shape(weight), eps)
        round_to = dtype if dtype in HALF and offset == 0.0 else None  # Llama's order; Gemma's rounds at the end
        return self._run(self._k.rms_norm, dtype, (x, weight), eps, round_to, offset)

    def rms_norm_backward(
        self, x: Array, weight: Array, dy: Array, /, *, eps: float = 1e-6, offset: float = 0.0
    ) -> tuple[Array, Array]:
        r"""``(dx, dweight)``: with r = rsqrt(mean(x²) + eps), n = x·r and g = dy·(offset + weight),
        ``dx = r · (g − n · mean(g·n))`` and ``dweight = sum(dy · n)`` over all leading axes.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> dx, dw = ops.rms_norm_backward(np.array([[3.0, 4.0]]), np.ones(2), np.array([[1.0, 0.0]]))
        >>> print(np.round(dx, 4), np.round(dw, 4))
        [[ 0.181  -0.1358]] [0.8485 0.    ]
        """
        fn = "rms_norm_backward"
        (x, weight, dy), dtype = self._floats(fn, x=x, weight=weight, dy=dy)
        eps, offset = self._positive(fn, "eps", eps), self._finite(fn, "offset", offset)
        checks.rms_norm(fn, shape(x), shape(weight), eps)
        checks.check_same_shape(fn, "dy", shape(dy), shape(x), "x")
        return self._run(self._k.rms_norm_backward, dtype, (x, weight, dy), eps, offset)

    def layer_norm(self, x: Array, weight: Array, bias: Array | None = None, /, *, eps: float = 1e-5) -> Array:
        r"""Layer normalisation over the last axis (Ba et al. 2016, arXiv:1607.06450):
        ``(x − mean(x)) · rsqrt(var(x) + eps) · weight + bias``, the variance biased (divided by D), as
        ``torch.nn.functional.layer_norm``.

        Cast order (pinned, torch's): a half input is computed in float32 — the normalisation, the weight
        and the bias — and only the result is cast back (`rms_norm` casts before the weight instead).

        Args:
            x: (..., D).  weight: (D,).  bias: (D,) or None.  eps: > 0.
        Returns:
            x's shape and dtype.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> print(np.round(ops.layer_norm(np.array([1.0, 3.0]), np.ones(2), np.array([0.5, 0.5])), 4))
        [-0.5  1.5]
        """
        fn = "layer_norm"
        (x, weight, bias), dtype = self._floats(fn, x=x, weight=weight, bias=bias)
        eps = self._positive(fn, "eps", eps)
        self._norm_shapes(fn, x, weight, bias)
        return self._run(self._k.layer_norm, dtype, (x, weight, bias), eps)

    def layer_norm_backward(
        self, x: Array, weight: Array, dy: Array, /, *, eps: float = 1e-5, bias: bool
    ) -> tuple[Array, Array, Array | None]:
        r"""``(dx, dweight, dbias)`` of `layer_norm`: with n the normalised x, r = rsqrt(var + eps) and
        g = dy·weight, ``dx = r · (g − mean(g) − n · mean(g·n))``, ``dweight = sum(dy · n)`` and
        ``dbias = sum(dy)`` over all leading axes; dbias is None unless ``bias``.

        >>> import numpy as np, tensorglot
        >>> ops = tensorglot.get_backend("numpy").ops
        >>> x = np.array([[0.0, 1.0, 5.0]])
        >>> dx, dw, db = ops.layer_norm_backward(x, np.ones(3), np.array([[1.0, 0.0, 0.0]]), bias=True)
        >>> print(np.round(dx, 4), np.round(dw, 4), db)
        [[ 0.1763 -0.2204  0.0441]] [-0.9258  0.      0.    ] [1. 0. 0.]
        """
        fn = "layer_norm_backward"
        (x, weight, dy), dtype = self._floats(fn, x=x, weight=weight, dy=dy)
        eps = self._positive(fn, "eps", eps)
        self._norm_shapes(fn, x, weight, None)
        checks.check_same_shape(fn, "dy", shape(dy), shape(x), "x")
        return self._run(self._k.layer_norm_backward, dtype, (x, weight, dy), eps, self._bool_option(fn, "bias", bias))

    # -- shared validation ------------------------------------------------------------------------

    def _mlp_inputs(self, fn, x, w_in, w_out, activation, dy=None):
        arrays, dtype = self._floats(fn, x=x, w_in=w_in, w_out=w_out, **({} if dy is None else {"dy": dy}))
        x, w_in, w_out = arrays[:3]
        checks.mlp(fn, shape(x), shape(w_in), shape(w_out))
        if dy is not None:
            checks.check_same_shape(fn, "dy", shape(arrays[3]), (*shape(x)[:-1], shape(w_out)[1]), "mlp's output")
        activation = self._static(fn, "activation", activation)
        checks.check_choice(fn, "activation", activation, checks.ACTIVATIONS)
        return arrays, dtype, activation

    def _norm_shapes(self, fn, x, weight, bias):
        checks.check_min_rank(fn, "x", shape(x), 1, "(..., D)")
        for arg, a in (("weight", weight), ("bias", bias)):
            if a is not None and shape(a) != shape(x)[-1:]:
                raise checks.bad_shape(fn, arg, shape(a), f"({shape(x)[-1]},), x's last axis")

    def _gated(self, fn, *arrays):
        """A gated MLP's front end (swiglu, geglu and their backward): validate, then run the one gated
        kernel (``gated_mlp`` or its backward) with ``fn``'s gate activation."""
        arrays, dtype = self._gated_inputs(fn, *arrays)
        kernel = self._k.gated_mlp_backward if fn.endswith("_backward") else self._k.gated_mlp
        return self._run(kernel, dtype, arrays, GATES[fn.removesuffix("_backward")])

    def _gated_inputs(self, fn, x, w_gate, w_up, w_down, dy=None):
        named = {"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down} | ({} if dy is None else {"dy": dy})
        arrays, dtype = self._floats(fn, **named)
        checks.swiglu(fn, *(shape(a) for a in arrays[:4]))
        if dy is not None:
            want = (*shape(arrays[0])[:-1], shape(arrays[3])[1])
            checks.check_same_shape(fn, "dy", shape(arrays[4]), want, f"{fn.removesuffix('_backward')}'s output")
        return arrays, dtype


#: The public names every backend provides, in the order the docs list them.
NAMES = (
    "softmax",
    "softmax_backward",
    "linear",
    "linear_backward",
    "mlp",
    "mlp_backward",
    "swiglu",
    "swiglu_backward",
    "geglu",
    "geglu_backward",
    "rms_norm",
    "rms_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "attention",
    "attention_backward",
    "causal_mask",
    "padding_mask",
)
