"""``tensorglot serve --port P``: an OpenAI-compatible HTTP server (Starlette on uvicorn) in front of the
in-process `OnlineEngine`, or, with ``--prefill-workers``/``--decode-workers``, of the router and worker
processes (`tensorglot.serving.cluster.WorkerEngine`, the same interface).

Endpoints: ``GET /health`` (200 once the model is loaded, 503 before), ``GET /v1/models``,
``POST /v1/completions`` and, when the checkpoint has a chat template, ``POST /v1/chat/completions``;
responses, server-sent-event chunks (``data: [DONE]`` last), ``usage`` and error bodies follow OpenAI's
schema (`tensorglot.serving.openai_schema`), so the ``openai`` client works unchanged. A handler turns the
request into one `Job` per prompt and choice; the engine thread calls each job's callbacks, which detokenise
(`TextStream`) and post events onto the handler's asyncio queue. A client that disconnects cancels its jobs.
SIGINT or SIGTERM: uvicorn stops accepting connections and waits for the open ones, then the engine drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from .cluster import WorkerEngine
from .model import DEMO_MODEL, Model
from .online import Job, OnlineEngine
from .openai_schema import ApiError, Plan, read_chat, read_completion, usage
from .text import Text, TextStream
from .workers import Options


class _Choice:
    """One choice's text and tokens as they arrive from the engine thread."""

    def __init__(self, index: int, prompt: list[int], stream: TextStream | None) -> None:
        self.index, self.prompt, self.stream = index, prompt, stream
        self.text, self.tokens = "", list[int]()
        self.reason: str | None = None


class _Request:
    """A request's jobs, and the queue their events come back on from the engine thread:
    ``(choice index, text piece, token or None, finish reason or None, error or None)``."""

    def __init__(self, plan: Plan, text: Text | None, engine: OnlineEngine | WorkerEngine) -> None:
        self.plan, self.loop = plan, asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, str, int | None, str | None, str | None]] = asyncio.Queue()
        self.choices, self.jobs = [], []
        for p, prompt in enumerate(plan.prompts):
            for j in range(plan.n):
                c = _Choice(p * plan.n + j, prompt, None if text is None else TextStream(text, plan.stop))
                self.choices.append(c)
                job = Job(np.asarray(prompt, dtype=np.int64), plan.params, self._on_token(c), self._on_finish(c), j)
                self.jobs.append(job)
        try:
            for job in self.jobs:
                engine.submit(job)
        except RuntimeError:  # the engine began draining: none of this request's jobs may run
            for job in self.jobs:
                job.cancelled = True
            raise

    def _post(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _on_token(self, c: _Choice) -> Any:
        def on_token(token: int) -> bool:
            piece, stopped = c.stream.push(token) if c.stream else ("", False)
            self._post(c.index, piece, token, None, None)
            return not stopped

        return on_token

    def _on_finish(self, c: _Choice) -> Any:
        def on_finish(reason: str, error: str | None) -> None:
            tail = c.stream.finish() if c.stream and reason in ("stop", "length") else ""
            self._post(c.index, tail, None, reason, error)

        return on_finish

    async def updates(self) -> AsyncIterator[tuple[_Choice, str, int | None]]:
        """(choice, new text, new token or None) until every choice has finished; a finish sets its reason."""
        left = len(self.choices)
        try:
            while left:
                index, piece, token, reason, error = await self.events.get()
                c = self.choices[index]
                if error is not None:
                    raise ApiError(f"generation failed: {error}", status=500)
                c.text += piece
                if token is not None:
                    c.tokens.append(token)
                if reason is not None:
                    c.reason, left = reason, left - 1
                yield c, piece, token
        finally:
            for job in self.jobs:
                job.cancelled = True  # no-op for finished jobs; frees the rest when the client left

    def usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.plan.prompts), sum(len(c.tokens) for c in self.choices))


def create_app(engine: OnlineEngine | WorkerEngine, text: Text | None, *, model_name: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(exc: ApiError) -> Response:
        return JSONResponse(exc.body, status_code=exc.status)

    def ready() -> None:
        if not engine.ready.is_set():
            raise ApiError("the model is still loading", status=503)
        if engine.load_error:
            raise ApiError(f"the model failed to load: {engine.load_error}", status=500)

    async def health(request: Request) -> Response:
        try:
            ready()
        except ApiError as exc:
            return error(exc)
        stats = dict(engine.stats) | ({"prefix_cache": engine.prefix.stats} if engine.prefix else {})
        return JSONResponse({"status": "ok", "model": model_name, "stats": stats})

    async def models(request: Request) -> Response:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "tensorglot"}
        if engine.config is not None:
            card["max_model_len"], card["vocab_size"] = engine.config.max_seq_len, engine.config.vocab_size
        return JSONResponse({"object": "list", "data": [card]})

    async def read(request: Request, reader: Any) -> Plan:
        ready()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"the request body is not valid JSON: {exc}") from None
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise ApiError(f"the model {body['model']!r} does not exist; this server has {model_name!r}",
                           param="model", status=404, kind="not_found_error")  # fmt: skip
        assert engine.config is not None
        return reader(body, text, engine.config)

    def endpoint(reader: Any, chat: bool) -> Any:
        async def handle(request: Request) -> Response:
            try:
                plan = await read(request, reader)
                req = _Request(plan, text, engine)
            except ApiError as exc:
                return error(exc)
            except RuntimeError as exc:  # the engine is draining
                return error(ApiError(str(exc), status=503))
            if plan.stream:
                return StreamingResponse(_sse(req, model_name, chat, text), media_type="text/event-stream")
            try:
                async for _ in req.updates():
                    pass
            except ApiError as exc:
                return error(exc)
            return JSONResponse(_response(req, model_name, chat, text))

        return handle

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.close)  # drain: the queued and running jobs finish

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", endpoint(read_completion, False), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(read_chat, True), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _echo(req: _Request, c: _Choice, text: Text | None) -> str:
    return text.decode(c.prompt) if req.plan.echo and text is not None else ""


def _choice_body(c: _Choice, content: str, chat: bool, *, delta: bool, tokens: list[int]) -> dict[str, Any]:
    body: dict[str, Any] = {"index": c.index, "logprobs": None, "finish_reason": c.reason, "token_ids": tokens}
    if not chat:
        body["text"] = content
    elif delta:
        body["delta"] = {"role": "assistant", "content": content}
    else:
        body["message"] = {"role": "assistant", "content": content}
    return body


def _head(req: _Request, model_name: str, chat: bool, *, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    prefix = "chatcmpl-" if chat else "cmpl-"
    return {"id": prefix + req.plan.id, "object": kind, "created": req.plan.created, "model": model_name}


def _response(req: _Request, model_name: str, chat: bool, text: Text | None) -> dict[str, Any]:
    choices = [_choice_body(c, _echo(req, c, text) + c.text, chat, delta=False, tokens=c.tokens) for c in req.choices]
    return _head(req, model_name, chat, chunk=False) | {"choices": choices, "usage": req.usage()}


async def _sse(req: _Request, model_name: str, chat: bool, text: Text | None) -> AsyncIterator[str]:
    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    head = _head(req, model_name, chat, chunk=True)
    for c in req.choices:
        first = _echo(req, c, text)
        if first or chat:
            yield event(head | {"choices": [_choice_body(c, first, chat, delta=True, tokens=[])]})
    try:
        async for c, piece, token in req.updates():
            tokens = [] if token is None else [token]
            yield event(head | {"choices": [_choice_body(c, piece, chat, delta=True, tokens=tokens)]})
    except ApiError as exc:
        yield event(exc.body)
    if req.plan.include_usage:
        yield event(head | {"choices": [], "usage": req.usage()})
    yield "data: [DONE]\n\n"


def run_http(args: Any) -> int:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers), then drain and return 0."""
    import uvicorn

    if args.checkpoint is None:  # the seeded random model, token-id prompts only (for load tests)
        text, name = None, args.model_name or "demo"
        model = Model(args.backend, DEMO_MODEL, seed=args.seed, dtype=args.dtype)
    else:
        directory = Path(args.checkpoint)
        text = Text.load(directory) if (directory / "tokenizer.json").is_file() else None
        name = args.model_name or directory.resolve().name
        model = Model(args.backend, checkpoint=str(directory), dtype=args.dtype)
    engine: Any
    if args.prefill_workers is None and args.decode_workers is None:
        engine = OnlineEngine(model, prefix_cache_blocks=args.prefix_cache_blocks, chunk_tokens=args.prefill_chunk)
    else:  # the router in this process, the workers in their own
        opts = Options(prefill_workers=args.prefill_workers or 1, decode_workers=args.decode_workers or 1,
                       timeout_s=args.timeout, transport=args.transport,
                       prefix_blocks=args.prefix_cache_blocks,
                       address="env://" if getattr(args, "torchrun", False) else None)  # fmt: skip
        engine = WorkerEngine(model, opts)
    app = create_app(engine, text, model_name=name)
    print(f"tensorglot serve: http://{args.host}:{args.port} model {name!r} on backend {args.backend}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=30))  # fmt: skip
    # uvicorn drains on SIGINT/SIGTERM, restores the handlers it found, then raises the signal again so
    # the process dies of it; handlers that ignore it make a drained server exit with status 0 instead.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    server.run()
    print("tensorglot serve: drained, exiting", file=sys.stderr)
    if isinstance(engine, WorkerEngine):
        # Drained and closed, but the transport's receive threads may still sit in a blocking C++ call on a
        # worker that has gone: one that wakes while the interpreter finalizes aborts the process (SIGABRT).
        # The work is done, so leave as the worker ranks do (`launch._exit`).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
