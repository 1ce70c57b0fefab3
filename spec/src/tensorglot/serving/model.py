"""What every serving process loads: a backend and either a seeded random model or a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..params import TransformerConfig, init_params
from ..registry import get_backend

#: The random model served without a checkpoint (a Llama-shaped toy: swiglu, GQA, NeoX RoPE).
DEMO_MODEL: dict[str, Any] = {
    "vocab_size": 512,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 8,
    "n_kv_heads": 2,
    "head_dim": 16,
    "d_ff": 384,
    "activation": "swiglu",
    "rope_style": "neox",
    "max_seq_len": 512,
}


@dataclass(frozen=True)
class Model:
    """A backend name and either ``config`` (a `TransformerConfig` dict) with ``seed`` or a Hugging Face
    ``checkpoint`` directory of any family `tensorglot.checkpoints.load_hf` reads. Plain data: it crosses
    process boundaries, and each process loads its own copy."""

    backend: str
    config: dict[str, Any] | None = None
    seed: int = 0
    checkpoint: str | None = None
    dtype: str = "float32"

    def load_config(self) -> TransformerConfig:
        if self.checkpoint is not None:
            from ..checkpoints import load_hf

            return load_hf(self.checkpoint)[1]
        if self.config is None:
            raise ValueError("Model: give a config or a checkpoint")
        return TransformerConfig.from_dict(self.config)

    def load(self) -> tuple[Any, dict[str, Any], TransformerConfig]:
        be = get_backend(self.backend)
        if self.checkpoint is not None:
            from ..checkpoints import load_hf

            raw, config = load_hf(self.checkpoint, dtype=self.dtype)
        else:
            config = self.load_config()
            raw = init_params(config, self.seed, dtype=self.dtype)
        return be, {k: be.asarray(v) for k, v in raw.items()}, config
