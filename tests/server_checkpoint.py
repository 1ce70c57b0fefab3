"""A tiny servable checkpoint made offline: a byte-level BPE ``tokenizer.json`` trained on a few sentences
(with multi-byte characters, so tokens split UTF-8), a chat template, and a random `transformers` Llama
whose vocabulary is the tokenizer's."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a naïve café serves crème brûlée to the señor",
    "日本語のテキストと emoji 🙂 mixed with words",
    "tensorglot serves tokens over http with sampling and streaming",
    "hello world, hello server, hello client",
] * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(directory: Path, *, chat: bool = True, vocab_size: int = 320) -> int:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"} | ({"chat_template": CHAT_TEMPLATE} if chat else {})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return int(tok.get_vocab_size())


def make_checkpoint(directory: Path, *, chat: bool = True, max_positions: int = 96) -> Path:
    """The tokenizer files plus a random ``LlamaForCausalLM`` (float32 safetensors) in ``directory``."""
    import torch
    import transformers

    vocab = make_tokenizer(directory, chat=chat)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights large enough that sampling differs from greedy
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
