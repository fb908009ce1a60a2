"""One interface for everything that talks to a model.

The GRM judge, the swarm's orchestrator and subagents, the RL environment and the evals all call a
`ChatClient`, so each of them runs unchanged against a k25 checkpoint in this process (the sampler behind
the chat format), any OpenAI-compatible endpoint (the k25 server, vLLM serving released weights), or a
scripted policy in tests. Results carry token ids and logprobs when the backend has them (token-in-token-out
for RL); an endpoint that does not return them leaves those fields None.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]


@dataclasses.dataclass
class ChatResult:
    """One assistant turn. `message` is an OpenAI-style assistant message: role, content,
    reasoning_content (thinking, or None) and tool_calls (list of {id, type, function{name, arguments}})."""

    message: Message
    finish_reason: str  # "stop" | "length" | "tool_calls"
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None

    @property
    def tool_calls(self) -> list[dict]:
        return list(self.message.get("tool_calls") or [])

    @property
    def content(self) -> str:
        return self.message.get("content") or ""


@runtime_checkable
class ChatClient(Protocol):
    """What a caller needs from a model: one assistant turn for a conversation."""

    model: str

    async def chat(self, messages: Sequence[Message], *, tools: Sequence[dict] | None = None,
                   temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 512, seed: int | None = None,
                   stop: Sequence[str] | None = None, chat_template_kwargs: dict | None = None) -> ChatResult: ...


class ClientError(RuntimeError):
    """The backend failed or answered something that is not an assistant turn (after retries)."""


def assistant_message(content: str | None = None, *, tool_calls: Sequence[dict] | None = None,
                      reasoning_content: str | None = None) -> Message:
    """An OpenAI-style assistant message; `tool_calls` entries may be given as (name, arguments dict)."""
    calls = []
    for i, call in enumerate(tool_calls or ()):
        if isinstance(call, tuple):
            name, args = call
            call = {"id": f"functions.{name}:{i}", "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
        calls.append(call)
    msg: Message = {"role": "assistant", "content": content, "reasoning_content": reasoning_content}
    if calls:
        msg["tool_calls"] = calls
    return msg


ScriptFn = Callable[[Sequence[Message], Sequence[dict] | None], "Message | str | Awaitable[Message | str]"]


class ScriptedClient:
    """A policy written in Python: `fn(messages, tools)` returns the assistant message (or plain text).

    For tests and baselines. `delay_s` simulates model latency (awaited, so concurrent callers overlap).
    Exceptions from `fn` propagate as `ClientError`, the way a failing endpoint would surface.
    """

    def __init__(self, fn: ScriptFn, *, model: str = "scripted", delay_s: float = 0.0) -> None:
        self.fn, self.model, self.delay_s = fn, model, delay_s
        self.calls = 0

    async def chat(self, messages, *, tools=None, temperature=1.0, top_p=1.0, max_tokens=512, seed=None,
                   stop=None, chat_template_kwargs=None) -> ChatResult:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        try:
            out = self.fn(list(messages), tools)
            if asyncio.iscoroutine(out) or isinstance(out, Awaitable):
                out = await out
        except Exception as e:  # noqa: BLE001 - surfaced to the caller as a backend failure
            raise ClientError(f"{self.model}: scripted policy raised {type(e).__name__}: {e}") from e
        msg = assistant_message(out) if isinstance(out, str) else {"role": "assistant", **out}
        return ChatResult(msg, "tool_calls" if msg.get("tool_calls") else "stop")


class LoopLocalOpenAI:
    """One `openai.AsyncOpenAI` per running event loop. Its connection pool belongs to the loop that first used
    it, and callers such as the RL stage run each rollout iteration in a fresh `asyncio.run` loop: a client
    reused from a closed loop fails with "Event loop is closed". Clients of closed loops are dropped."""

    def __init__(self, *, base_url: str | None, api_key: str | None, timeout_s: float, max_retries: int) -> None:
        self.kwargs = dict(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=max_retries)
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def get(self) -> Any:
        import openai

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            self._clients = {lp: c for lp, c in self._clients.items() if not lp.is_closed()}
            client = self._clients[loop] = openai.AsyncOpenAI(**self.kwargs)
        return client


class OpenAIClient:
    """Any OpenAI-compatible endpoint through the official `openai` client.

    Asks for `return_token_ids` (the vLLM / k25-server extension) and per-token logprobs; servers that do not
    know the extension ignore it and the result's id fields stay None.

    Usable from any number of event loops, one after another (see `LoopLocalOpenAI`).
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout_s: float = 120.0, max_retries: int = 2, token_ids: bool = True) -> None:
        self.model = model
        self.token_ids = token_ids
        self._openai = LoopLocalOpenAI(base_url=base_url, api_key=api_key, timeout_s=timeout_s,
                                       max_retries=max_retries)

    @property
    def _client(self) -> Any:
        return self._openai.get()

    async def chat(self, messages, *, tools=None, temperature=1.0, top_p=1.0, max_tokens=512, seed=None,
                   stop=None, chat_template_kwargs=None) -> ChatResult:
        import openai

        extra: dict[str, Any] = {}
        if self.token_ids:
            extra["return_token_ids"] = True
        if chat_template_kwargs:
            extra["chat_template_kwargs"] = dict(chat_template_kwargs)
        kwargs: dict[str, Any] = dict(model=self.model, messages=list(messages), temperature=temperature,
                                      top_p=top_p, max_tokens=max_tokens, logprobs=self.token_ids)
        if tools:
            kwargs["tools"] = list(tools)
        if seed is not None:
            kwargs["seed"] = seed
        if stop:
            kwargs["stop"] = list(stop)
        try:
            resp = await self._client.chat.completions.create(**kwargs, extra_body=extra or None)
        except openai.OpenAIError as e:
            raise ClientError(f"{self.model}: {type(e).__name__}: {e}") from e
        if not resp.choices:
            raise ClientError(f"{self.model}: the endpoint returned no choices")
        data = resp.model_dump()
        choice = data["choices"][0]
        m = choice["message"] or {}
        msg = assistant_message(m.get("content"), tool_calls=m.get("tool_calls") or (),
                                reasoning_content=m.get("reasoning_content"))
        logprobs = None
        if choice.get("logprobs") and choice["logprobs"].get("content") is not None:
            logprobs = [t["logprob"] for t in choice["logprobs"]["content"]]
        return ChatResult(msg, choice.get("finish_reason") or "stop", prompt_ids=data.get("prompt_token_ids"),
                          token_ids=choice.get("token_ids"), logprobs=logprobs)


class SamplerClient:
    """A k25 model in this process: the chat format renders the prompt, the sampler's continuous batch
    generates (`await sampler.submit`), the format parses the turn. Results carry the prompt ids, sampled ids
    and their logprobs exactly as the sampler returned them (token-in-token-out), as the server would.

    `chat_template_kwargs={"thinking": False}` per call (or `thinking=False` here) renders the non-thinking
    generation prompt. Malformed tool calls come back in `message["invalid_tool_calls"]`.
    """

    def __init__(self, sampler: Any, chat_format: Any, *, model: str = "k25", thinking: bool = True) -> None:
        from k25.serve.engine import Engine

        self.model, self.thinking = model, thinking
        self.engine = Engine(sampler, chat_format, model_name=model)

    async def chat(self, messages, *, tools=None, temperature=1.0, top_p=1.0, max_tokens=512, seed=None,
                   stop=None, chat_template_kwargs=None) -> ChatResult:
        from k25.serve.engine import BadRequest, assistant_turn

        kwargs = {"thinking": self.thinking, **(chat_template_kwargs or {})}
        try:
            prompt = self.engine.chat_prompt(list(messages), list(tools) if tools else None, None, kwargs)
            max_new = self.engine.check_length(len(prompt.ids), max_tokens)
            (choice,) = await self.engine.generate(prompt.ids, n=1, max_tokens=max_new, temperature=temperature,
                                                   top_p=top_p, top_k=None, seed=seed, stop_ids=prompt.stop_ids,
                                                   stop=list(stop or ()), top_logprobs=0, media=prompt.media)
        except BadRequest as e:
            raise ClientError(f"{self.model}: {e}") from e
        msg, reason = assistant_turn(choice, prompt.thinking)
        return ChatResult(msg, reason, prompt_ids=list(prompt.ids), token_ids=choice.token_ids,
                          logprobs=choice.logprobs)
