"""The OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/chat/completions, /v1/completions.

Bad input never reaches the sampler as an exception: malformed JSON is a 400, fields that fail validation a
422, a wrong key a 401, an unknown model a 404 and a prompt past the context a 400 naming the limit, each
with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; the server keeps serving.
Streaming (`stream: true`) answers with server-sent events in the OpenAI chunk format, tool calls as
`delta.tool_calls` entries; the chunks are sent once the sampler returns the completion (it hands back whole
completions), ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k25.serve.engine import BadRequest, Engine, assistant_turn
from k25.serve.protocol import ChatCompletionRequest, CompletionRequest

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
        choices = await engine.generate(prompt.ids, n=req.n, max_tokens=max_tokens, temperature=req.temperature,
                                        top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop_ids=prompt.stop_ids,
                                        stop=req.stop_strings(), top_logprobs=top, prefix=prompt.prefix,
                                        media=prompt.media)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": sum(len(c.token_ids) for c in choices),
                 "total_tokens": len(prompt.ids) + sum(len(c.token_ids) for c in choices)}
        out = []
        for i, c in enumerate(choices):
            msg, reason = assistant_turn(c, prompt.thinking)
            entry: dict[str, Any] = {"index": i, "message": msg, "finish_reason": reason, "logprobs": None}
            if req.logprobs:
                entry["logprobs"] = {"content": [_logprobs_entry(engine, t, lp, tp) for t, lp, tp in zip(
                    c.token_ids, c.logprobs, c.top_logprobs or [[]] * len(c.token_ids))]}
            if req.return_token_ids:
                entry["token_ids"] = c.token_ids
            out.append(entry)
        body: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": now, "model": engine.model_name,
                                "choices": out, "usage": usage}
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt.ids
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_chat_stream(body, include_usage), media_type="text/event-stream")
        return body

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        p = req.prompt
        if isinstance(p, list) and not p or isinstance(p, str) and not p:
            raise BadRequest("prompt is empty", param="prompt")
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        out, n_prompt, n_gen, all_ids = [], 0, 0, []
        for prompt in prompts:
            ids = engine.text_prompt(prompt)
            if not ids:
                raise BadRequest("a prompt encodes to no tokens", param="prompt")
            max_tokens = engine.check_length(len(ids), req.max_tokens or 16)
            choices = await engine.generate(ids, n=req.n, max_tokens=max_tokens, temperature=req.temperature,
                                            top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop_ids=(),
                                            stop=req.stop_strings(), top_logprobs=req.logprobs or 0)
            n_prompt, all_ids = n_prompt + len(ids), all_ids + [ids]
            for c in choices:
                n_gen += len(c.token_ids)
                entry: dict[str, Any] = {"index": len(out), "text": c.text, "finish_reason": c.finish_reason,
                                         "logprobs": None}
                if req.logprobs is not None:
                    entry["logprobs"] = {"tokens": [engine.token_text(t) for t in c.token_ids],
                                         "token_logprobs": c.logprobs,
                                         "top_logprobs": [{engine.token_text(t): v for t, v in tp}
                                                          for tp in c.top_logprobs] or None}
                if req.return_token_ids:
                    entry["token_ids"] = c.token_ids
                    entry["prompt_token_ids"] = ids
                out.append(entry)
        body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": now, "model": engine.model_name,
                                "choices": out, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                                          "total_tokens": n_prompt + n_gen}}
        if req.return_token_ids:
            body["prompt_token_ids"] = all_ids[0] if len(all_ids) == 1 else all_ids
        if req.stream:
            return StreamingResponse(_completion_stream(body), media_type="text/event-stream")
        return body

    return app


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chat_stream(body: dict, include_usage: bool) -> AsyncIterator[str]:
    """The finished response as OpenAI chunks: role, reasoning, content, one delta per tool call, finish."""
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    for choice in body["choices"]:
        i, msg = choice["index"], choice["message"]

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            return _sse(head | {"choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                             "logprobs": None, **extra}]})

        yield chunk({"role": "assistant", "content": ""})
        if msg.get("reasoning_content"):
            yield chunk({"reasoning_content": msg["reasoning_content"]})
        if msg.get("content"):
            yield chunk({"content": msg["content"]}, **({"logprobs": choice["logprobs"]} if choice["logprobs"] else {}))
        for k, call in enumerate(msg.get("tool_calls") or ()):
            yield chunk({"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                         "function": {"name": call["function"]["name"], "arguments": ""}}]})
            yield chunk({"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]})
        extra = {"token_ids": choice["token_ids"]} if "token_ids" in choice else {}
        yield chunk({}, choice["finish_reason"], **extra)
    if include_usage:
        yield _sse(head | {"choices": [], "usage": body["usage"]})
    yield "data: [DONE]\n\n"


async def _completion_stream(body: dict) -> AsyncIterator[str]:
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "text_completion"}
    for choice in body["choices"]:
        yield _sse(head | {"choices": [{"index": choice["index"], "text": choice["text"], "finish_reason": None,
                                        "logprobs": choice["logprobs"]}]})
        yield _sse(head | {"choices": [{"index": choice["index"], "text": "", "finish_reason": choice["finish_reason"],
                                        "logprobs": None}]})
    yield "data: [DONE]\n\n"
