"""`tensorglot serve`: every backend's tokens equal `generate`, the JSON shape, --prompts, --checkpoint
(a tiny offline Llama), errors; the command comes from the plugin that provides the transport."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tensorglot
from tensorglot.cli import _builtins, main
from tensorglot.registry import registry
from tensorglot.serving import DEMO_MODEL, Model

pytestmark = pytest.mark.skipif(
    "serve" not in registry().commands(), reason="needs a serving transport plugin (tensorglot-torch)"
)
BACKENDS = [b for b in ("numpy", "torch", "jax") if b in tensorglot.available_backends()]


def test_serve_is_a_plugin_command_not_a_builtin():
    assert "serve" not in _builtins()
    assert registry().commands()["serve"].plugin == "torch = tensorglot_torch.plugin"
    assert "torch" in registry().transports()


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_gives_the_tokens_of_generate_on_every_backend(backend, tmp_path, capsys):
    prompts = [[5, 17, 300, 42], [7, 7, 1, 511]]  # one length: jax compiles once
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    argv = ["serve", "--backend", backend, "--prompts", str(tmp_path / "p.json"), "--max-new-tokens", "5", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    be, params, config = Model(backend, DEMO_MODEL, seed=0).load()
    want = be.to_numpy(
        be.layers.generate(params, config, be.asarray(np.array(prompts), dtype="int64"), max_new_tokens=5)
    )
    assert [r["tokens"] for r in out["requests"]] == want[:, 4:].tolist()
    assert out["summary"]["mode"] == "disaggregated (1 prefill + 1 decode)"
    assert all(r["kv_digest_ok"] and r["worker"] == 1 for r in out["requests"])


@pytest.mark.timeout(120)
def test_serve_json_with_prompts_file(tmp_path, capsys):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], list(range(510))]  # 510 + 5 passes max_seq_len = 512
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    argv = ["serve", "--backend", "numpy", "--prompts", str(path), "--max-new-tokens", "5", "--colocated"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"requests", "summary"}
    first = out["requests"][0]
    assert {"prompt", "tokens", "ttft_s", "tpot_s", "kv_bytes"} <= set(first)
    assert first["prompt"] == [1, 2, 3] and len(first["tokens"]) == 5
    assert out["requests"][2]["tokens"] == [] and "max_seq_len = 512" in out["requests"][2]["error"]
    s = out["summary"]
    assert {"ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "tokens_per_s"} <= set(s)
    assert (s["completed"], s["rejected"]) == (2, 1)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_serve_a_hugging_face_checkpoint_gives_generate_tokens(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the checkpoint is built with transformers")
    torch = pytest.importorskip("torch", reason="transformers builds the checkpoint with torch")
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    argv = ["serve", "--backend", "numpy", "--checkpoint", str(tmp_path / "ckpt"), "--prompts"]
    assert main([*argv, str(tmp_path / "p.json"), "--max-new-tokens", "6", "--prefill-workers", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    from tensorglot.checkpoints import load_llama

    params, config = load_llama(tmp_path / "ckpt")
    layers = tensorglot.get_backend("numpy").layers
    for p, rec in zip(prompts, out["requests"]):
        assert rec["tokens"] == layers.generate(params, config, np.array([p]), max_new_tokens=6)[0, len(p) :].tolist()
        assert rec["kv_bytes"] == 2 * 2 * len(p) * 2 * 8 * 4  # k and v, 2 layers, (P, K=2, H=8) float32


def test_bad_prompt_len_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--prompt-len", "9:3"])
    assert "1 <= A <= B" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorglot serve: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--requests", "-3"], "argument --requests: wanted a positive int, got '-3'"),
        (["--requests", "0"], "argument --requests: wanted a positive int, got '0'"),
        (["--prefill-workers", "0"], "argument --prefill-workers: wanted a positive int, got '0'"),
        (["--timeout", "0"], "argument --timeout: wanted a positive, finite number of seconds, got '0'"),
        (["--timeout", "-5"], "argument --timeout: wanted a positive, finite number of seconds, got '-5'"),
        (["--arrival-interval", "-1"], "argument --arrival-interval: wanted a finite number of seconds >= 0"),
    ],
)
def test_serve_refuses_flags_it_cannot_honour_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--backend", "numpy", "--colocated", *flags])
    assert exit_.value.code != 0
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "cannot read --prompts"),
        ("[[1, 2]", "is not JSON"),
        ("[1, 2, 3]", "holds a flat list of numbers; wanted a list of token-id lists, e.g. [[1, 2, 3]]"),
        ('{"a": 1}', "must hold a non-empty JSON list of token-id lists"),
        ("[]", "must hold a non-empty JSON list of token-id lists"),
    ],
)
def test_a_prompts_file_that_holds_no_prompts_is_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    assert main(["serve", "--backend", "numpy", "--colocated", "--prompts", str(path)]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.timeout(120)
def test_bad_prompts_in_the_file_fail_alone_and_the_table_prints(tmp_path, capsys):
    prompts = [[1, 2, 3], [[1, 2], [3, 4]], [1.5, 2], [1, 10**30], [], [4, 5]]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prompts))
    argv = ["serve", "--backend", "numpy", "--colocated", "--prompts", str(path), "--max-new-tokens", "2"]
    assert main([*argv, "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)["requests"]
    assert [r["error"] is None for r in recs] == [True, False, False, False, False, True]
    assert [len(r["tokens"]) for r in recs] == [2, 0, 0, 0, 0, 2]
    assert "got float64 values: [1.5, 2]" in recs[2]["error"]  # refused, never truncated to [1, 2]
    assert recs[1]["prompt"] == [[1, 2], [3, 4]] and recs[3]["prompt"] == [1, 10**30]
    assert main(argv) == 0  # the table prints a failed request's reason
    out = capsys.readouterr().out
    assert "must be 1-D" in out and "completed 2/6 (rejected 4" in out
