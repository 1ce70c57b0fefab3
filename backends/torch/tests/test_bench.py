"""The bench's baseline transformer is the same function as ours (else its ratio would mean nothing)."""

from __future__ import annotations

import torch

from tensorglot import TransformerConfig, init_params
from tensorglot_torch.bench import BuiltinTransformer
from tensorglot_torch.nn import Transformer


def test_builtin_baseline_computes_our_transformer():
    c = TransformerConfig(
        vocab_size=40,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_ff=24,
        activation="swiglu",
        rope_style="neox",
        max_seq_len=32,
    )
    params = init_params(c, 0, dtype="float64")
    tokens = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    theirs = BuiltinTransformer({k: torch.from_numpy(v) for k, v in params.items()}, c)
    torch.testing.assert_close(theirs(tokens), Transformer.from_params(params, c)(tokens), rtol=1e-10, atol=1e-12)
