"""A short run of examples/train_tiny.py: the loss falls, the checkpoint reloads exactly, sampling runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_ships_with_the_package():
    data = load_example().corpus()
    assert data.numel() > 2000 and int(data.max()) < 256


def test_a_short_run_lowers_the_loss_and_round_trips_the_checkpoint(tmp_path):
    ex = load_example()
    model, losses = ex.train(steps=20, batch=8, seq=32, progress=False)
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.0  # about ln 256 = 5.5 before training
    assert last < first - 1.0, losses
    path = tmp_path / "tiny.safetensors"
    ex.save(model, path)
    reloaded = ex.load(path)
    assert reloaded.config == model.config
    probe = torch.tensor([list(b"The clockmaker")])
    torch.testing.assert_close(reloaded(probe), model(probe), rtol=0, atol=0)
    text = ex.sample(reloaded, "Once", new=12)
    assert text.startswith("Once") and len(text.encode("utf-8", errors="replace")) >= 12
