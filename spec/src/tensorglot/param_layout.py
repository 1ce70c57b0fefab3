"""Which parameters one layer of a `TransformerConfig` has: the names and shapes `param_shapes` puts
together (the table in `tensorglot.params`), split by sublayer for the layers that read them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .params import TransformerConfig

from .kernels import GATES

#: The gated MLPs (three weights: w_gate, w_up, w_down).
GATED = tuple(GATES)


def norm_names(name: str, config: TransformerConfig, /) -> tuple[str, ...]:
    """A norm's parameter names: ``(name,)``, and ``name_bias`` with ``norm_bias``."""
    return (name, name + "_bias") if config.norm_bias else (name,)


def block_norms(config: TransformerConfig, /) -> tuple[str | None, str | None, str | None, str | None]:
    """(attn_norm, post_attn_norm, mlp_norm, post_mlp_norm) of a block of ``config``, None where absent."""
    pl = config.norm_placement
    pre = pl != "post"
    post = pl in ("sandwich", "post")
    return (
        "attn_norm" if pre else None,
        "post_attn_norm" if post else None,
        "mlp_norm" if pre else None,
        "post_mlp_norm" if post else None,
    )


def attention_shapes(config: TransformerConfig, /) -> dict[str, tuple[int, ...]]:
    """One layer's attention parameters (without the ``layers.{i}.`` prefix), in canonical order."""
    c = config
    D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for name, heads in (("q", N), ("k", K), ("v", K)):
        shapes["w" + name] = (D, heads, H)
        if c.qkv_bias:
            shapes["b" + name] = (heads, H)
    if c.qk_norm is not None:
        shapes |= {"q_norm": (H,), "k_norm": (H,)} if c.qk_norm == "head" else {"q_norm": (N * H,), "k_norm": (K * H,)}
    shapes["wo"] = (N, H, D)
    if c.o_bias:
        shapes["bo"] = (D,)
    return shapes


def mlp_shapes(config: TransformerConfig, /) -> dict[str, tuple[int, ...]]:
    """One layer's MLP parameters (without the prefix): weights, then biases with ``mlp_bias``."""
    c = config
    D, F = c.d_model, c.d_ff
    if c.activation in GATED:
        shapes: dict[str, tuple[int, ...]] = {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
        biases: dict[str, tuple[int, ...]] = {"b_gate": (F,), "b_up": (F,), "b_down": (D,)}
    else:
        shapes, biases = {"w_in": (D, F), "w_out": (F, D)}, {"b_in": (F,), "b_out": (D,)}
    return shapes | biases if c.mlp_bias else shapes
