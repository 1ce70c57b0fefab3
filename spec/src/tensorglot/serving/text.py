"""Text in and out of the server: a checkpoint's ``tokenizer.json`` (the `tokenizers` library), its chat
template, incremental detokenisation and stop strings.

* `Text.load(dir)` reads ``tokenizer.json``, ``tokenizer_config.json`` (``chat_template``, ``bos_token``,
  ``eos_token``) and ``config.json``'s ``eos_token_id``. The end-of-sequence ids become stop token ids.
* `TextStream` turns a request's tokens into text pieces as they are generated. A piece is the new tail
  of the decode of *all* tokens so far, held back while that decode ends in U+FFFD (a multi-byte UTF-8
  character split across tokens) and while its end could begin a stop string. So the pieces always
  concatenate to the full decode, up to the first stop string (excluded, as OpenAI's API does). Decoding
  the whole prefix each time costs O(n²) in the output length, small next to a decode step at the
  lengths served here, and it is exact for tokenizers whose decode of a prefix is a prefix of the decode
  (byte-level BPE, WordPiece, word level), where windowed schemes must guess.
* `Text.render_chat(messages)` renders the template with jinja2's sandbox, as Hugging Face's
  ``apply_chat_template`` does (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``,
  ``add_generation_prompt=True``); its tokens are taken without adding special tokens again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """A chat request the template cannot render (the server answers 400 with the message)."""


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as {"content": "...", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class Text:
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    _template: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: str | Path) -> Text:
        from tokenizers import Tokenizer

        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"Text.load: no tokenizer.json in {d} (the server needs one for text)")
        tokenizer = Tokenizer.from_file(str(path))
        tc = _read_json(d / "tokenizer_config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):  # a list of named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
        ids = _read_json(d / "config.json").get("eos_token_id")
        eos_ids = {ids} if isinstance(ids, int) else set(ids or ())
        if eos is not None and tokenizer.token_to_id(eos) is not None:
            eos_ids.add(tokenizer.token_to_id(eos))
        return cls(tokenizer, template if isinstance(template, str) else None, bos, eos, tuple(sorted(eos_ids)))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("chat: this checkpoint's tokenizer_config.json has no chat_template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        import jinja2

        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        try:
            return str(self._template.render(messages=messages, add_generation_prompt=True, **specials))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat: the chat template refused the messages: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open() as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def _compile(source: str) -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat: rendering the chat template needs jinja2 (pip install jinja2)") from None

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat: the checkpoint's chat_template does not compile: {exc}") from None


class TextStream:
    """One completion's text, piece by piece: `push` each generated token, then `finish` once.

    ``push`` returns ``(piece, stopped)``: the text that is now final, and whether a stop string ended
    the completion (the text before it is in ``piece``; nothing follows)."""

    def __init__(self, text: Text, stop: tuple[str, ...] = ()) -> None:
        self.text, self.stop = text, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.decoded = ""  # the decode of self.tokens up to its last complete character
        self.sent = 0  # characters of self.decoded already returned
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            raise RuntimeError("TextStream.push: the completion already stopped")
        self.tokens.append(token)
        full = self.text.decode(self.tokens)
        if not full.endswith("\ufffd"):  # an incomplete UTF-8 character decodes to U+FFFD: wait for the rest
            self.decoded = full
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended (a trailing incomplete character comes out as U+FFFD)."""
        if self.stopped:
            return ""
        self.decoded = self.text.decode(self.tokens)
        return self._release(final=True)[0]

    def _release(self, *, final: bool) -> tuple[str, bool]:
        pending = self.decoded[self.sent :]
        # A match starts in the unsent text: every sent piece was cleared of stop strings and their prefixes.
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.sent = len(self.decoded)
            return pending[: min(hits)], True
        keep = 0 if final else _held(pending, self.stop)
        piece = pending[: len(pending) - keep]
        self.sent += len(piece)
        return piece, False


def _held(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
