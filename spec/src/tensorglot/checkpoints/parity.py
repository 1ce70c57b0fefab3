"""Parity with Hugging Face: tiny random models of each family, made offline with ``transformers``, run
here and there. ``python -m tensorglot.checkpoints.parity [--backends numpy,torch,jax,xp]`` prints the
family × backend table of max |logit − HF| (float32) and whether greedy decoding gives HF ``generate``'s
tokens with both caches; ``docs/models.md`` holds its output. ``tests/test_families.py`` uses the same
models. Needs torch and transformers (imported when called, not at import).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import numpy as np

#: Each family's tiny Hugging Face config (transformers-5 class name, its keyword arguments). Windows
#: (5) are shorter than the sequences (`SEQ`), norms and biases are drawn at random by `tiny_model`.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "llama-biases": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=12)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "olmo2": ("Olmo2Config", {}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5, use_parallel_residual=True)),
    "gpt_neox-sequential": ("GPTNeoXConfig", dict(rotary_pct=1.0, use_parallel_residual=False)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=8,
            query_pre_attn_scalar=10,
            sliding_window=5,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}
_SIZES = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
#: The prompt, and the tokens decoded after it: both longer than every window.
SEQ, NEW = 12, 8
BACKENDS = ("numpy", "torch", "jax", "xp")


def tiny_model(family: str, *, seed: int = 0) -> Any:
    """A float32 ``transformers`` model of ``family`` in eval mode, every weight random (HF starts norms
    at one and biases at zero, which would hide a wrong mapping of either), no EOS (so ``generate``
    always makes every token)."""
    import torch
    import transformers

    cls, extra = FAMILIES[family]
    sizes = {} if cls == "GPT2Config" else dict(_SIZES)
    if cls == "GPTNeoXConfig":
        del sizes["num_key_value_heads"]  # GPT-NeoX has one kv head per query head
    cfg = getattr(transformers, cls)(**sizes, **extra, vocab_size=61, bos_token_id=0, eos_token_id=None)
    cfg.pad_token_id = 0
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and not name.endswith("bias"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt(vocab: int = 61, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).integers(1, vocab, size=(batch, SEQ))


def hf_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def hf_generate(model: Any, tokens: np.ndarray, new: int = NEW) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(tokens), max_new_tokens=new, do_sample=False, top_k=None, top_p=None)
    return out.numpy()


def run(backend: str, params: dict, config: Any, tokens: np.ndarray, cache: str | None = None) -> np.ndarray:
    """Logits (cache None) or greedy tokens (cache a kind) of the spec on ``backend``, as NumPy."""
    import tensorglot

    be = tensorglot.get_backend(backend)
    bp = {k: be.asarray(v) for k, v in params.items()}
    tok = be.asarray(tokens.astype(np.int64), "int64" if backend != "jax" else "int32")
    if cache is None:
        return np.asarray(be.to_numpy(be.layers.transformer(tok, bp, config)))
    return np.asarray(be.to_numpy(be.layers.generate(bp, config, tok, max_new_tokens=NEW, cache=cache)))


def row(family: str, backends: tuple[str, ...] = BACKENDS) -> dict[str, tuple[float, bool] | str]:
    """Per backend (max |logit − HF|, greedy equal with both caches) or why it could not run."""
    from . import load_hf

    model = tiny_model(family)
    tokens = prompt()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        params, config = load_hf(tmp)
    want, want_tokens = hf_logits(model, tokens), hf_generate(model, tokens)
    out: dict[str, tuple[float, bool] | str] = {}
    for name in backends:
        try:
            diff = float(np.abs(run(name, params, config, tokens) - want).max())
            same = all(
                np.array_equal(run(name, params, config, tokens, kind), want_tokens) for kind in ("contiguous", "paged")
            )
            out[name] = (diff, same)
        except Exception as err:  # the table reports what failed
            out[name] = f"{type(err).__name__}: {err}"[:60]
    return out


def table(families: list[str], backends: tuple[str, ...]) -> str:
    lines = ["| family | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for family in families:
        cells = row(family, backends)
        shown = [c if isinstance(c, str) else f"{c[0]:.1e} {'yes' if c[1] else 'NO'}" for c in cells.values()]
        lines.append(f"| {family} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tensorglot.checkpoints.parity", description=__doc__)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args(argv)
    print(table(args.families.split(","), tuple(args.backends.split(","))))


if __name__ == "__main__":
    main()
