"""The OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/chat/completions, /v1/completions.

Bad input never reaches the sampler as an exception: malformed JSON is a 400, fields that fail validation a
422, a wrong key a 401, an unknown model a 404 and a prompt past the context a 400 naming the limit, each
with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; the server keeps serving.
Streaming (`stream: true`) answers with server-sent events in the OpenAI chunk format as the sampler samples
(`Sampler.stream`): text in complete characters, `reasoning_content` inside the thinking block, nothing while
a tool-call section is open and each call as `delta.tool_calls` entries (id and name, then arguments) once it
closes, then finish_reason, the usage chunk (`stream_options.include_usage`) and `data: [DONE]`. What is held
back and why: k25/serve/stream.py; the streamed deltas add up to the non-streamed answer. The request is
checked (and a bad one answered with the error body) before the first byte; a failure after that is an
`error` event. A client that goes away cancels its requests, which frees their sampler slots at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k25.infer import Token
from k25.serve.engine import BadRequest, ChatPrompt, Choice, Engine, assistant_turn
from k25.serve.protocol import ChatCompletionRequest, CompletionRequest
from k25.serve.stream import ChatStream, TextStream

log = logging.getLogger(__name__)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


def _logprobs_entry(engine: Engine, token: int, lp: float, top: list[tuple[int, float]]) -> dict:
    text = engine.token_text(token)
    return {"token": text, "logprob": lp, "bytes": list(text.encode()),
            "top_logprobs": [{"token": engine.token_text(t), "logprob": v, "bytes": list(engine.token_text(t).encode())}
                             for t, v in top]}


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; with `api_key`, every /v1 route needs `Authorization: Bearer KEY`."""
    app = FastAPI(title="k25 OpenAI-compatible server")
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "Incorrect API key provided; send 'Authorization: Bearer <key>'.",
                              kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, f"the request body is not valid JSON: {errors[0].get('msg')}", code="invalid_json")
        first = errors[0] if errors else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                           for e in errors[:5])
        return _error(422, f"invalid request: {detail}", param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.exception_handler(BadRequest)
    async def on_bad(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    def check_model(name: str) -> None:
        if name != engine.model_name:
            raise BadRequest(f"The model `{name}` does not exist; this server serves `{engine.model_name}`.",
                             param="model", status=404, code="model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": created,
                                            "owned_by": "k25", "max_model_len": engine.max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        prompt = engine.chat_prompt(req.messages, req.tools, req.tool_choice, req.chat_template_kwargs)
        max_tokens = engine.check_length(len(prompt.ids), req.max_completion_tokens or req.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else 0
        job = dict(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                   seed=req.seed, stop_ids=(*prompt.stop_ids, *(req.stop_token_ids or ())), stop=req.stop_strings(),
                   top_logprobs=top, prefix=prompt.prefix, media=prompt.media)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            events: asyncio.Queue = asyncio.Queue()
            on_token = lambda i, t: events.put_nowait((i, t))
            (task,) = await _launch([engine.generate(prompt.ids, **job, on_token=on_token)], events)
            head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": engine.model_name}
            return _EventStream(_chat_events(engine, req, prompt, task, events, head), [task])
        choices = await engine.generate(prompt.ids, **job)
        usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": sum(len(c.token_ids) for c in choices),
                 "total_tokens": len(prompt.ids) + sum(len(c.token_ids) for c in choices)}
        out = []
        for i, c in enumerate(choices):
            msg, reason = assistant_turn(c, prompt.thinking)
            entry: dict[str, Any] = {"index": i, "message": msg, "finish_reason": reason, "logprobs": None}
            if req.logprobs:
                entry["logprobs"] = {"content": _chat_logprobs(engine, c.token_ids, c.logprobs, c.top_logprobs)}
            if req.return_token_ids:
                entry["token_ids"] = c.token_ids
            out.append(entry)
        body: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": now, "model": engine.model_name,
                                "choices": out, "usage": usage}
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt.ids
        return body

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        p = req.prompt
        if isinstance(p, list) and not p or isinstance(p, str) and not p:
            raise BadRequest("prompt is empty", param="prompt")
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        jobs = []
        for prompt in prompts:
            ids = engine.text_prompt(prompt)
            if not ids:
                raise BadRequest("a prompt encodes to no tokens", param="prompt")
            jobs.append((ids, engine.check_length(len(ids), req.max_tokens or 16)))
        kw = dict(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                  stop_ids=tuple(req.stop_token_ids or ()), stop=req.stop_strings(), top_logprobs=req.logprobs or 0)
        if req.stream:
            events: asyncio.Queue = asyncio.Queue()

            def listener(k: int) -> Callable[[int, Token], None]:
                return lambda i, t: events.put_nowait((k * req.n + i, t))

            tasks = await _launch([engine.generate(ids, max_tokens=m, **kw, on_token=listener(k))
                                   for k, (ids, m) in enumerate(jobs)], events)
            head = {"id": rid, "object": "text_completion", "created": now, "model": engine.model_name}
            return _EventStream(_completion_events(engine, req, [ids for ids, _ in jobs], tasks, events, head),
                                tasks)
        out, n_prompt, n_gen = [], 0, 0
        for ids, max_tokens in jobs:
            choices = await engine.generate(ids, max_tokens=max_tokens, **kw)
            n_prompt += len(ids)
            for c in choices:
                n_gen += len(c.token_ids)
                entry: dict[str, Any] = {"index": len(out), "text": c.text, "finish_reason": c.finish_reason,
                                         "logprobs": None}
                if req.logprobs is not None:
                    entry["logprobs"] = _text_logprobs(engine, c.token_ids, c.logprobs, c.top_logprobs)
                if req.return_token_ids:
                    entry["token_ids"] = c.token_ids
                    entry["prompt_token_ids"] = ids
                out.append(entry)
        body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": now, "model": engine.model_name,
                                "choices": out, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                                          "total_tokens": n_prompt + n_gen}}
        if req.return_token_ids:
            body["prompt_token_ids"] = jobs[0][0] if len(jobs) == 1 else [ids for ids, _ in jobs]
        return body

    return app


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_logprobs(engine: Engine, ids: list[int], lps: list[float], tops: list) -> list[dict]:
    return [_logprobs_entry(engine, t, lp, tp) for t, lp, tp in zip(ids, lps, tops or [[]] * len(ids))]


def _text_logprobs(engine: Engine, ids: list[int], lps: list[float], tops: list) -> dict:
    return {"tokens": [engine.token_text(t) for t in ids], "token_logprobs": list(lps),
            "top_logprobs": [{engine.token_text(t): v for t, v in tp} for tp in tops] or None}


class _EventStream(StreamingResponse):
    """Server-sent events of running generations. However the response ends (finished, or the client went away
    mid-stream: the stream is cancelled, or a send fails), the body is closed and the generations are cancelled,
    which frees their sampler slots at the next step."""

    def __init__(self, events: AsyncIterator[str], tasks: list[asyncio.Task]):
        super().__init__(events, media_type="text/event-stream")
        self.tasks = tasks

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for t in self.tasks:
                t.cancel()
            await self.body_iterator.aclose()


async def _launch(generations: list[Awaitable[list[Choice]]], events: asyncio.Queue) -> list[asyncio.Task]:
    """Start the generations as tasks that put None on `events` when they end. The tasks' first steps run
    before this returns: that is where Engine.generate validates its requests, so a bad request raises here,
    before any byte of the response is sent."""
    tasks = [asyncio.ensure_future(g) for g in generations]
    for t in tasks:
        t.add_done_callback(lambda _: events.put_nowait(None))
    await asyncio.sleep(0)
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        for t in tasks:
            t.cancel()
        raise failed[0].exception()
    return tasks


async def _generated(tasks: list[asyncio.Task], events: asyncio.Queue) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, Token) as tokens are sampled, and (-1 - k, [Choice]) when generation k ends."""
    finished: set[int] = set()
    while len(finished) < len(tasks):
        item = await events.get()
        if item is not None:
            yield item
            continue
        for k, t in enumerate(tasks):
            if t.done() and k not in finished:
                finished.add(k)
                yield -1 - k, t.result()


def _failure(e: Exception) -> str:
    log.exception("streamed generation failed")
    if isinstance(e, BadRequest):
        return _sse(error_body(str(e), param=e.param, code=e.code))
    return _sse(error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error"))


async def _chat_events(engine: Engine, req: ChatCompletionRequest, prompt: ChatPrompt, task: asyncio.Task,
                       events: asyncio.Queue, head: dict) -> AsyncIterator[str]:
    """The chat chunks of `task`'s choices as their tokens arrive (see the module docstring)."""
    stop = req.stop_strings()
    live_logprobs = req.logprobs and not stop  # a stop string may cut tokens already sampled: then at the end
    streams = [ChatStream(engine.chat, prefix=prompt.prefix, thinking=prompt.thinking, stop=stop)
               for _ in range(req.n)]
    seen: list[list[Token]] = [[] for _ in range(req.n)]
    sent = [0] * req.n  # tokens whose logprobs were sent, per choice

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None, **extra: Any) -> str:
        return _sse(head | {"choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                         "logprobs": None if logprobs is None else {"content": logprobs},
                                         **extra}]})

    try:
        first = {"prompt_token_ids": prompt.ids} if req.return_token_ids else {}
        for i in range(req.n):
            yield _sse(head | first | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None, "logprobs": None}]})
        async for i, item in _generated([task], events):
            if i >= 0:
                seen[i].append(item)
                for delta in streams[i].push(item.id):
                    lps = None
                    if live_logprobs and sent[i] < len(seen[i]):
                        toks = seen[i][sent[i]:]
                        lps = _chat_logprobs(engine, [t.id for t in toks], [t.logprob for t in toks],
                                             [t.top_logprobs for t in toks])
                        sent[i] = len(seen[i])
                    yield chunk(i, delta, logprobs=lps)
                continue
            choices: list[Choice] = item
            for i, c in enumerate(choices):
                msg, reason = assistant_turn(c, prompt.thinking)
                for delta in streams[i].finish(msg):
                    yield chunk(i, delta)
                rest = _chat_logprobs(engine, c.token_ids[sent[i]:], c.logprobs[sent[i]:],
                                      c.top_logprobs[sent[i]:]) if req.logprobs and c.token_ids[sent[i]:] else None
                yield chunk(i, {}, reason, rest, **({"token_ids": c.token_ids} if req.return_token_ids else {}))
            if (req.stream_options or {}).get("include_usage"):
                gen = sum(len(c.token_ids) for c in choices)
                yield _sse(head | {"choices": [], "usage": {"prompt_tokens": len(prompt.ids), "completion_tokens": gen,
                                                            "total_tokens": len(prompt.ids) + gen}})
    except Exception as e:  # the status line is out: the failure is an event
        yield _failure(e)
    yield "data: [DONE]\n\n"


async def _completion_events(engine: Engine, req: CompletionRequest, prompts: list[list[int]],
                             tasks: list[asyncio.Task], events: asyncio.Queue, head: dict) -> AsyncIterator[str]:
    """The text_completion chunks of every prompt's choices (index prompt * n + choice) as tokens arrive."""
    stop = req.stop_strings()
    want_logprobs = req.logprobs is not None
    streams = [TextStream(engine.chat, stop) for _ in range(len(prompts) * req.n)]
    seen: list[list[Token]] = [[] for _ in streams]
    sent = [0] * len(streams)
    n_gen = 0

    def chunk(i: int, text: str, finish: str | None = None, logprobs: dict | None = None, **extra: Any) -> str:
        return _sse(head | {"choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs,
                                         **extra}]})

    try:
        async for i, item in _generated(tasks, events):
            if i >= 0:
                seen[i].append(item)
                text = streams[i].push(item.id)
                if text:
                    lps = None
                    if want_logprobs and not stop:
                        toks, sent[i] = seen[i][sent[i]:], len(seen[i])
                        lps = _text_logprobs(engine, [t.id for t in toks], [t.logprob for t in toks],
                                             [t.top_logprobs for t in toks] if req.logprobs else [])
                    yield chunk(i, text, logprobs=lps)
                continue
            k = -1 - i
            for j, c in enumerate(item):
                i = k * req.n + j
                n_gen += len(c.token_ids)
                rest = _text_logprobs(engine, c.token_ids[sent[i]:], c.logprobs[sent[i]:],
                                      c.top_logprobs[sent[i]:]) if want_logprobs and c.token_ids[sent[i]:] else None
                extra = {"token_ids": c.token_ids, "prompt_token_ids": prompts[k]} if req.return_token_ids else {}
                yield chunk(i, streams[i].finish(c.text), c.finish_reason, rest, **extra)
        if (req.stream_options or {}).get("include_usage"):
            n_prompt = sum(len(p) for p in prompts)
            yield _sse(head | {"choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                                        "total_tokens": n_prompt + n_gen}})
    except Exception as e:  # the status line is out: the failure is an event
        yield _failure(e)
    yield "data: [DONE]\n\n"
