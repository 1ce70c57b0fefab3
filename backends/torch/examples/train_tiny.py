"""Train a tiny byte-level Transformer on the corpus that ships with tensorglot-torch.

    python backends/torch/examples/train_tiny.py --steps 300 --out /tmp/tiny.safetensors

AdamW over `tensorglot_torch.nn.Transformer` (every op an autograd.Function), a tqdm progress bar
with the running loss, a safetensors checkpoint written and read back (tensors only, no pickle), then
text sampled with a KV cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tensorglot import TransformerConfig
from tensorglot_torch.nn import Transformer

CONFIG = TransformerConfig(
    vocab_size=256,  # bytes
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=128,
    activation="swiglu",
    max_seq_len=256,
)


def corpus() -> torch.Tensor:
    text = resources.files("tensorglot_torch").joinpath("data/tiny_corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)


def batches(data: torch.Tensor, *, batch: int, seq: int, generator: torch.Generator):
    """Random windows: (tokens, targets), each (batch, seq), targets shifted by one byte."""
    while True:
        start = torch.randint(0, len(data) - seq - 1, (batch, 1), generator=generator)
        idx = start + torch.arange(seq + 1)  # (batch, seq + 1)
        window = data[idx]
        yield window[:, :-1], window[:, 1:]


def train(*, steps: int, batch: int = 16, seq: int = 64, lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """Returns (model, losses)."""
    torch.manual_seed(seed)
    model = Transformer(CONFIG, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = batches(corpus(), batch=batch, seq=seq, generator=torch.Generator().manual_seed(seed))
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress, file=sys.stderr)
    for _ in bar:
        tokens, targets = next(data)
        loss = model.loss(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return model, losses


def save(model: Transformer, path: str | Path) -> None:
    tensors = {k: v.contiguous() for k, v in model.to_params().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(model.config.to_dict())})


def load(path: str | Path) -> Transformer:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        config = TransformerConfig.from_dict(json.loads(fh.metadata()["config"]))
    return Transformer.from_params(load_file(str(path)), config)


@torch.no_grad()
def sample(model: Transformer, prompt: str, *, new: int, temperature: float = 0.8, seed: int = 0) -> str:
    """Sample ``new`` bytes after ``prompt``, feeding one byte a step through a KV cache."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([list(prompt.encode())])
    cache = model.kv_cache(1, tokens.shape[1] + new, kind="paged")
    logits = model(tokens, cache=cache)
    out = list(prompt.encode())
    for _ in range(new):
        probs = torch.softmax(logits[0, -1] / temperature, -1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    return bytes(out).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="checkpoint path (.safetensors); default a temp file")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--new", type=int, default=160, help="bytes to sample")
    args = parser.parse_args(argv)

    model, losses = train(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr)
    k = max(1, min(10, len(losses) // 2))
    print(f"loss: first {k} steps {sum(losses[:k]) / k:.3f} → last {k} steps {sum(losses[-k:]) / k:.3f}")

    path = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "tiny.safetensors"
    save(model, path)
    reloaded = load(path)
    probe = torch.tensor([list(b"The workshop")])
    assert torch.equal(reloaded(probe), model(probe)), "the reloaded checkpoint gives other logits"
    print(f"checkpoint: {path} ({path.stat().st_size / 1e3:.0f} kB), reloaded: same logits")

    print("sample:", repr(sample(reloaded, args.prompt, new=args.new)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
