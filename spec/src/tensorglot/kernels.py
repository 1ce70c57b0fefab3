"""What a backend writes: the kernels behind the spec's front ends.

The front ends (`tensorglot.ops.Ops`, `tensorglot.encodings.Encodings`, and the layers) validate and
convert everything first, so a kernel receives only checked arrays of this backend, all in the compute
dtype (float32 for half-precision inputs, otherwise the input dtype; the front end casts back), and
options that are plain Python values. A kernel does no validation. A backend gathers its kernels into
one namespace, ``backend.kernels`` (see `tensorglot.backend.ArrayBackend`).

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
    x is rounded to it before the weight multiplies (Llama's cast order).

Each front-end method calls its kernel by the same name (``Ops.softmax`` calls ``kernels.softmax(x,
axis)``): the call there is the kernel's signature, arrays first, then options, all positional. The
backward kernels return a tuple with one gradient per array input (None for an absent bias).

Arguments, as the front end passes them:
  * ``mask``: a bool array of rank 4, (B|1, N|1, S|1, T|1), True = attend; combine with ``causal``
    (bottom-right: query i sees key j iff j <= i + T − S).
  * ``scale``: a float (1/√H filled in).  ``activation``: one of relu, gelu, gelu_tanh, silu.
  * ``rope``: ``positions`` is an int array (S,) or (B, S), or None for arange(S); ``inv_freq`` a NumPy
    float32 (r/2,) table (`tensorglot.encodings.frequency_table`); angles are
    ``float32(position) * inv_freq`` in float32, cos and sin in x's dtype, both times ``mscale``;
    ``sign`` is +1.0 (rope) or −1.0 (its backward, the inverse rotation); ``style`` interleaved pairs
    (2i, 2i + 1), neox pairs (i, i + r/2); features past ``rotary_dim`` pass through.
"""

from __future__ import annotations

#: The blockwise attention pair, provided only with the "flash" capability.
FLASH = ("flash_attention", "flash_attention_backward")
