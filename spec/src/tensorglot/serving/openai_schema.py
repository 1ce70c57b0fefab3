"""The OpenAI API's request fields as the server reads them, and its response and error bodies.

`read_completion` and `read_chat` turn a decoded JSON body into a `Plan` (token-id prompts, sampling
parameters, stop strings, ``n``, ``echo``, ``stream``) or raise `ApiError`, whose `body` is OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Fields the server does not implement (``logprobs``,
``best_of`` other than ``n``, tools) are refused by name rather than ignored. Extensions, as vLLM names
them: ``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``; each choice also carries its
``token_ids``, so a client can compare tokens, not only text.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..params import TransformerConfig
from .sampling import SamplingParams
from .text import ChatTemplateError, Text


class ApiError(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.param = status, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    @property
    def body(self) -> dict[str, Any]:
        code = {404: "model_not_found", 503: "unavailable"}.get(self.status)
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": code}}


@dataclass
class Plan:
    prompts: list[list[int]]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    n: int = 1
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(f"{name} must be a finite number, got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, got {value!r}", param=name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _strings(body: dict[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ApiError(f"{name} must be a string or a list of strings, got {value!r}", param=name)


def _token_ids(value: Any, name: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ApiError(f"{name} must be a list of integer token ids, got {value!r}", param=name)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(f"{name}: token ids must lie in [0, {vocab_size}), got {bad[:8]}", param=name)
    return list(value)


def _prompts(value: Any, text: Text | None, vocab_size: int) -> list[list[int]]:
    """``prompt``: a string, a list of token ids, or a list of either (several prompts)."""
    items = value if isinstance(value, list) and value and isinstance(value[0], str | list) else [value]
    prompts = []
    for item in items:
        if isinstance(item, str):
            if text is None:
                raise ApiError("prompt: this checkpoint has no tokenizer.json; send token ids", param="prompt")
            prompts.append(_token_ids(text.encode(item), "prompt", vocab_size))  # a tokenizer larger than the model
        else:
            prompts.append(_token_ids(item, "prompt", vocab_size))
        if not prompts[-1]:
            raise ApiError("prompt must hold at least one token", param="prompt")
    return prompts


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in ("logprobs", "top_logprobs", "tools", "functions", "suffix"):
        if body.get(name) not in (None, False):
            raise ApiError(f"{name} is not supported by this server", param=name)
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise ApiError("best_of other than n is not supported by this server", param="best_of")


def _plan(body: dict[str, Any], prompts: list[list[int]], config: TransformerConfig, eos: tuple[int, ...], *,
          default_max: int | None) -> Plan:  # fmt: skip
    _refuse_unsupported(body)
    longest = max(len(p) for p in prompts)
    room = config.max_seq_len - longest
    if room < 1:
        raise ApiError(
            f"prompt of {longest} tokens leaves no room in the model's context of {config.max_seq_len} tokens",
            param="prompt",
        )
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _integer(body, name, None)
    if max_tokens is None:  # a default never overflows the context; an explicit value may, and is refused
        max_tokens = room if default_max is None else min(default_max, room)
    if max_tokens < 1:
        raise ApiError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if longest + max_tokens > config.max_seq_len:
        raise ApiError(
            f"prompt of {longest} tokens + max_tokens {max_tokens} = {longest + max_tokens} is longer than "
            f"the model's context of {config.max_seq_len} tokens",
            param="max_tokens",
        )
    top_k = _integer(body, "top_k", 0)
    stop_ids = _token_ids(body.get("stop_token_ids") or [], "stop_token_ids", config.vocab_size)
    if not _flag(body, "ignore_eos"):
        stop_ids += list(eos)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_k=0 if top_k == -1 else int(top_k or 0),  # vLLM writes "off" as -1
        top_p=_number(body, "top_p", 1.0),
        min_p=_number(body, "min_p", 0.0),
        seed=_integer(body, "seed", None),
        stop_token_ids=tuple(sorted(set(stop_ids))),
    )
    try:
        params.check(config.vocab_size)
    except ValueError as exc:
        raise ApiError(str(exc).removeprefix("SamplingParams: "), param=str(exc).split()[1]) from None
    n = _integer(body, "n", 1)
    if n is None or not 1 <= n <= 16:
        raise ApiError(f"n must be an integer in [1, 16], got {n!r}", param="n")
    options = body.get("stream_options") or {}
    return Plan(
        prompts, params, _strings(body, "stop"), n, _flag(body, "echo"), _flag(body, "stream"),
        bool(isinstance(options, dict) and options.get("include_usage")),
    )  # fmt: skip


def read_completion(body: Any, text: Text | None, config: TransformerConfig) -> Plan:
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("prompt") is None:
        raise ApiError("prompt is required", param="prompt")
    eos = text.eos_token_ids if text else ()
    return _plan(body, _prompts(body["prompt"], text, config.vocab_size), config, eos, default_max=16)


def read_chat(body: Any, text: Text | None, config: TransformerConfig) -> Plan:
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    if text is None or text.chat_template is None:
        raise ApiError("this checkpoint has no chat template: use /v1/completions", status=404, kind="not_found_error")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError("messages must be a non-empty list of objects", param="messages")
    plain = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: only text is understood
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise ApiError("messages: only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError("messages: each needs a string role and content", param="messages")
        plain.append({"role": m["role"], "content": content})
    try:
        rendered = text.render_chat(plain)
    except ChatTemplateError as exc:
        raise ApiError(str(exc), param="messages") from None
    if body.get("echo"):
        raise ApiError("echo is not supported for chat", param="echo")
    return _plan(body, [text.encode(rendered, special=False)], config, text.eos_token_ids, default_max=None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
