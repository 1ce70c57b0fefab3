"""What a backend writes: the kernels behind the spec's front ends.

The front ends (`tensorglot.ops.Ops`, `tensorglot.encodings.Encodings`, and the layers) validate and
convert everything first, so a kernel receives only checked arrays of this backend, all in the compute
dtype (float32 for half-precision inputs, otherwise the input dtype; the front end casts back), and
options that are plain Python values. A kernel does no validation. A backend gathers its kernels into
one namespace, ``backend.kernels`` (see `tensorglot.backend.ArrayBackend`). A kernel written against the
Array API standard takes its namespace and device from its inputs with `namespace` and `device` here.

Each differentiable kernel comes with its explicit backward (``*_backward``), the spec's formula written
out. On an autograd framework the forward kernel is the framework's wrapper (``torch.autograd.Function``
with ``ctx.save_for_backward``, ``jax.custom_vjp``) whose backward runs the same formula, so gradients
flow through the public op.

Numerical rules every kernel keeps (the conformance suite checks each on every backend):
  * softmax subtracts the row maximum; a row that is all −inf gives zeros; a row whose maximum is +inf
    gives its +inf entries equal weight (the limit) and 0 elsewhere; NaN in a row makes the row NaN.
  * attention scales q before the product, ``(q · scale) kᵀ``, and its probabilities follow softmax's
    rules above; a query that sees no key gives zeros.
  * rms_norm normalises in the compute dtype; with ``round_to`` (the input's half dtype) the normalised
    x is rounded to it before the weight multiplies (Llama's cast order). Its last option, ``offset``
    (default 0.0), is added to the weight: ``n · (offset + weight)``; the front end passes ``round_to``
    None when ``offset`` ≠ 0, so Gemma's product stays in float32 and only the result is cast.

Each front-end method calls its kernel by the same name (``Ops.softmax`` calls ``kernels.softmax(x,
axis)``): the call there is the kernel's signature, arrays first, then options, all positional. The
backward kernels return a tuple with one gradient per array input (None for an absent bias).

Arguments, as the front end passes them:
  * ``mask``: a bool array of rank 4, (B|1, N|1, S|1, T|1), True = attend; combine with ``causal``
    (bottom-right: query i sees key j iff j <= i + T − S) and ``window``.
  * attention's options after ``scale``: ``softcap`` (a float or None) caps the scaled scores,
    ``softcap · tanh(s / softcap)``, before masking; ``window`` (an int W or None, only with causal) also
    hides key j from query i where ``j <= i + T − S − W``. The flash kernels take ``block_size`` before
    them: ``flash_attention(q, k, v, causal, mask, scale, block_size, softcap, window)``. Both default to
    None. Blockwise kernels skip the tiles `visible_keys` and `visible_queries` leave out.
  * ``scale``: a float (1/√H filled in).  ``activation``: one of relu, gelu, gelu_tanh, silu.
  * ``rope``: ``positions`` is an int array (S,) or (B, S), or None for arange(S); ``inv_freq`` a NumPy
    float32 (r/2,) table (`tensorglot.encodings.frequency_table`); angles are
    ``float32(position) * inv_freq`` in float32, cos and sin in x's dtype, both times ``mscale``;
    ``sign`` is +1.0 (rope) or −1.0 (its backward, the inverse rotation); ``style`` interleaved pairs
    (2i, 2i + 1), neox pairs (i, i + r/2); features past ``rotary_dim`` pass through.

The layers' kernels (`tensorglot.layers` composes the rest of the transformer from the ops' kernels and
array-API operations; these are what the array API lacks). Arrays first, int arrays and sizes after:
  * ``embedding(table, tokens)``: ``table[tokens]``, (V, D) and (B, S) ints → (B, S, D), in table's
    dtype (a gather: the front end does not cast it). ``embedding_backward(dx, tokens, vocab)``: the
    (vocab, D) scatter-add of dx's rows at their tokens — a token read twice gets both rows.
  * ``cross_entropy(logits, targets)``: the 0-d mean over (B, S) of ``lse(logits) − logits[target]``,
    the log-sum-exp max-subtracted. ``cross_entropy_backward(logits, dloss, targets)``: ``(softmax(logits)
    − onehot(targets)) · dloss / (B·S)``; ``dloss`` is a 0-d array.
  * ``cache_write(storage, slots, rows) -> storage``: rows (K, n, H) written at the int (n,) slots of a
    cache's kv-head-major (K, slots, H) storage (``storage[:, slots[i]] = rows[:, i]``), and the storage
    returned: the same array written in place (NumPy, xp where the namespace can write, torch, which
    writes detached rows: a cache holds no autograd graph) or a new one (JAX's ``.at[].set``). A slot may
    repeat (a serving pool's idle rows share a scratch block); which of its rows it then holds is unspecified.
    A `tensorglot.cache.KVCache` allocates and reads its storage itself with the array API.
  * With the ``grad`` capability, ``autograd_value_and_grad(fn, params) -> (value, grads)``: how the
    backend differentiates a scalar function of a dict of arrays with its own autograd (torch.autograd
    on fresh leaves, jax.value_and_grad). The conformance suite checks with it that autograd through
    `Layers.loss` equals the explicit `Layers.value_and_grad`.
  * Optional: ``inference(params)``, a context manager `Layers.generate` enters around its steps (every step
    reads every weight again, and computes no gradient). Inside it a backend may keep its products'
    weights in a layout they read faster, and must drop those copies on exit; the results stay those of
    the kernels above, up to rounding. Torch packs them for oneDNN (`tensorglot_torch.prepack`).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, is_lazy_array
from array_api_compat import device as device  # re-exported: with `namespace`, what a standard kernel asks of an array

_NAMESPACES: dict[type, Any] = {}


def namespace(x: Any) -> Any:
    """``array_namespace(x)`` of one array, memoised by its type. Kernels written against the standard ask
    it of nearly every input, some 60 times a decoding step, and array-api-compat's general lookup costs
    8 µs a call on NumPy and 14 µs on array_api_strict, more than a multiply there. The memo is only for
    types whose namespace does not depend on the array: a NumPy array of JAX's float0 dtype (a zero
    cotangent) belongs to JAX, so a NumPy array of a void dtype takes the general lookup."""
    void = getattr(getattr(x, "dtype", None), "kind", "") == "V"
    xp = None if void else _NAMESPACES.get(type(x))
    if xp is None:
        xp = array_namespace(x)
        if not void:
            _NAMESPACES[type(x)] = xp
    return xp


_EAGER: set[type] = set()


def is_lazy(x: Any) -> bool:
    """``array_api_compat.is_lazy_array(x)``, remembered for a type it found eager. For a type it does not
    know (array_api_strict's) it reads one element, 4 arrays and ~50 µs a call, asked by every softmax;
    an eager array type stays eager. A lazy answer is asked again (JAX's is by class, and cheap)."""
    if type(x) in _EAGER:
        return False
    if is_lazy_array(x):
        return True
    _EAGER.add(type(x))
    return False


#: The blockwise attention pair, provided only with the "flash" capability.
FLASH = ("flash_attention", "flash_attention_backward")


#: The gated MLPs and their gate's activation: ``swiglu`` and ``geglu`` (and their backwards) are one pair
#: of kernels, ``gated_mlp(x, w_gate, w_up, w_down, activation)`` and ``gated_mlp_backward(..., dy, activation)``.
GATES = {"swiglu": "silu", "geglu": "gelu_tanh"}


def visible_keys(i0: int, i1: int, s: int, t: int, causal: bool, window: int | None) -> tuple[int, int]:
    """The keys ``[lo, hi)`` that some query of ``[i0, i1)`` may see (bottom-right causal, sliding window),
    ``(0, 0)`` when none: a blockwise kernel visits only the key tiles that meet this range."""
    if not causal:
        return 0, t
    hi = min(t, i1 + t - s)  # the last query sees keys j <= i1 − 1 + T − S
    lo = 0 if window is None else max(0, i0 + t - s - window + 1)  # the first sees j > i0 + T − S − W
    return (lo, hi) if lo < hi else (0, 0)


def visible_queries(j0: int, j1: int, s: int, t: int, causal: bool, window: int | None) -> tuple[int, int]:
    """The queries ``[lo, hi)`` that see some key of ``[j0, j1)``, ``(0, 0)`` when none: the query tiles a
    key tile's backward visits."""
    if not causal:
        return 0, s
    lo = max(0, j0 - (t - s))  # key j is seen from query j − (T − S) on
    hi = s if window is None else min(s, j1 - 1 - (t - s) + window)  # until query j − (T − S) + W − 1
    return (lo, hi) if lo < hi else (0, 0)


def visible_keys_mask(rows: Any, cols: Any, offset: int, window: int | None) -> Any:
    """(len(rows), len(cols)) bool, in ``rows``' array library: query ``rows[i]`` sees key ``cols[j]`` iff
    ``cols[j] <= rows[i] + offset`` (bottom-right causal, offset = T − S) and, with a window W,
    ``cols[j] > rows[i] + offset − W``."""
    xp = namespace(rows)  # reshape, not [:, None]: array_api_strict's indexing costs a decoding step
    diagonal, cols = xp.reshape(rows, (-1, 1)) + offset, xp.reshape(cols, (1, -1))  # (S, 1), (1, T)
    see = cols <= diagonal  # (S, T)
    return see if window is None else see & (cols > diagonal - window)


def softcapped(scores: Any, softcap: float | None) -> tuple[Any, Any]:
    """``(softcap · tanh(scores / softcap), its derivative 1 − tanh²)``, or ``(scores, None)`` without a cap,
    in the scores' own array library (any array-API namespace, traced JAX arrays included)."""
    if softcap is None:
        return scores, None
    t = namespace(scores).tanh(scores / softcap)
    return softcap * t, 1.0 - t * t
