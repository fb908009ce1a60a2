"""A scripted OpenAI-compatible endpoint for tests: FastAPI serving /v1/chat/completions from a Python
policy, on 127.0.0.1 and a free port, in a background thread, with a bounded number of requests."""

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse


def make_app(policy, *, model: str = "scripted") -> FastAPI:
    """`policy(messages, tools)` returns an assistant message dict, plain text, or a `fastapi` Response
    (to answer garbage); it may be async."""
    app = FastAPI()
    app.state.requests = 0

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        app.state.requests += 1
        body = await request.json()
        out = policy(body["messages"], body.get("tools"))
        if asyncio.iscoroutine(out):
            out = await out
        if isinstance(out, (JSONResponse, PlainTextResponse)):
            return out
        msg = {"role": "assistant", "content": out} if isinstance(out, str) else dict(out)
        calls = msg.get("tool_calls") or None
        message = {"role": "assistant", "content": msg.get("content"), "tool_calls": calls}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", model),
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop",
                             "logprobs": None}],
                "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4, "completion_tokens": 1,
                          "total_tokens": 1}}

    return app


@contextlib.contextmanager
def serve(app: FastAPI, *, max_requests: int = 2000, start_timeout_s: float = 30.0):
    """Run `app` on 127.0.0.1 (a socket bound here, so no port race) for the duration of the block; yields
    the base URL (.../v1). The server stops after `max_requests` requests at most."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", log_config=None, access_log=False, lifespan="off",
                            limit_max_requests=max_requests, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the scripted endpoint did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
