"""`tensorglot.serving.text`: streamed pieces concatenate to the full decode, multi-byte characters are
held back until complete, stop strings cut the text where they start, and the chat template renders."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="the server's text goes through the tokenizers library")

from server_checkpoint import SENTENCES, make_tokenizer

from tensorglot.serving.text import ChatTemplateError, Text, TextStream


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return Text.load(d)


def _stream(text: Text, tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    s, pieces = TextStream(text, stop), []
    for t in tokens:
        piece, stopped = s.push(t)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return [*pieces, s.finish()], False


def test_the_tokenizer_round_trips_and_knows_its_specials(text):
    ids = text.encode(SENTENCES[1])
    assert ids[0] == 0  # the post-processor's <s>
    assert text.decode(ids) == SENTENCES[1]
    assert text.eos_token_ids == (1,) and text.bos_token == "<s>"


def test_pieces_concatenate_to_the_full_decode_and_hold_back_split_characters(text):
    rng = np.random.default_rng(0)
    split_seen = False
    for trial in range(60):
        source = SENTENCES[trial % len(SENTENCES)]
        tokens = text.encode(source, special=False) if trial % 2 else rng.integers(2, text.vocab_size, 25).tolist()
        pieces, _ = _stream(text, tokens)
        assert "".join(pieces) == text.decode(tokens)
        if "\ufffd" not in text.decode(tokens):
            assert all("\ufffd" not in p for p in pieces)
        split_seen |= any("\ufffd" in text.decode(tokens[:i]) for i in range(1, len(tokens)))
    assert split_seen, "no token sequence split a UTF-8 character: the hold-back went untested"


def test_a_stop_string_cuts_the_text_where_it_starts(text):
    tokens = text.encode(SENTENCES[3], special=False)
    full = text.decode(tokens)
    for stop in [("tokens",), ("http w",), ("zzz", "sampling"), ("streaming",), ("absent",)]:
        pieces, stopped = _stream(text, tokens, stop)
        cut = min((full.find(s) for s in stop if s in full), default=None)
        assert "".join(pieces) == (full if cut is None else full[:cut])
        assert stopped is (cut is not None)


def test_chat_template_renders_and_refuses(text, tmp_path):
    out = text.render_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert out == "<s><|system|>be brief\n<|user|>hello\n<|assistant|>"
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        text.render_chat([{"role": "tool", "content": "x"}])
    make_tokenizer(tmp_path, chat=False)
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        Text.load(tmp_path).render_chat([{"role": "user", "content": "hi"}])
