"""One agent's loop: model turn, concurrent tool calls, step limit, context management.

The orchestrator, every subagent and the single-agent baseline are this loop around a `ChatClient`; they
differ only in their tools and limits. A step is one model turn. The tool calls of a turn run concurrently
(`asyncio.gather`) and each comes back as its own `tool` message with the call's `tool_call_id`, in call
order, right after the assistant turn: the OpenAI/Kimi chat-format convention, so together they are the
turn's one observation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

from k25.infer.client import ChatClient, ClientError, Message
from k25.swarm.config import SwarmConfig
from k25.tools.base import Tool, ToolResult, Toolset

TurnHook = Callable[[int, list[dict]], None]


def estimate_tokens(messages: Sequence[Message]) -> int:
    """Context size estimate for context management when no tokenizer is given: ~4 characters per token
    plus a few tokens of role markup per message."""
    chars = 0
    for m in messages:
        content = m.get("content")
        chars += len(content if isinstance(content, str) else json.dumps(content or "", ensure_ascii=False))
        chars += len(m.get("reasoning_content") or "")
        if m.get("tool_calls"):
            chars += len(json.dumps(m["tool_calls"], ensure_ascii=False))
    return chars // 4 + 4 * len(messages)


def tool_message(call_id: str, result: ToolResult) -> Message:
    """The `tool` message answering one call (OpenAI's fields only: role, tool_call_id, content). An error is
    shown to the model as `Error: ...`."""
    text = result.text or ""
    if result.error:
        text = f"Error: {result.error}" + (f"\n{text}" if text else "")
    if result.images:
        text += f"\n[{len(result.images)} image(s) returned]"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _clean_assistant(message: Any) -> Message:
    """The assistant turn as it goes back into the history; raises ValueError on something that is not one."""
    if not isinstance(message, dict):
        raise ValueError(f"the model returned {type(message).__name__}, not an assistant message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"assistant content must be text, got {type(content).__name__}")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ValueError("assistant tool_calls must be a list of {id, type, function{name, arguments}}")
    # a call without an id gets the Kimi-style one, so the history and its tool message agree
    calls = [c if c.get("id") else {**c, "id": f"functions.{(c.get('function') or {}).get('name')}:{k}"}
             for k, c in enumerate(calls)]
    out: Message = {"role": "assistant", "content": content}
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    if calls:
        out["tool_calls"] = calls
    return out


class Agent:
    """One agent run. Attributes are live, so a run cut off by a timeout still reports how far it got.

    `status`: "running" | "done" (answered) | "step_limit" | "budget" (`out_of_budget()` said stop, e.g. the
    critical-step budget is spent) | "error" (the backend failed or answered garbage) | "timeout" (set by
    the caller that cancelled it). Malformed tool calls the backend reports (`invalid_tool_calls`, as the
    chat format's parser returns them) are answered with an error tool message, like a bad call.
    """

    def __init__(self, client: ChatClient, system_prompt: str, task: str, tools: Sequence[Tool] | Toolset, *,
                 max_steps: int,
                 config: SwarmConfig, after_turn: TurnHook | None = None,
                 out_of_budget: Callable[[], bool] | None = None,
                 count_tokens: Callable[[Sequence[Message]], int] = estimate_tokens) -> None:
        self.client, self.tools = client, Toolset(tools)
        self.max_steps, self.config, self.after_turn, self.count_tokens = max_steps, config, after_turn, count_tokens
        self.out_of_budget = out_of_budget
        self.messages: list[Message] = [{"role": "system", "content": system_prompt},
                                        {"role": "user", "content": task}]
        self.steps = 0
        self.tool_calls = 0
        self.context_resets = 0
        self.answer = ""
        self.status = "running"
        self.error: str | None = None

    async def _call(self, call: dict) -> tuple[str, ToolResult]:
        """One tool call; anything the model got wrong (unknown tool, bad JSON, schema) is an error result."""
        return call["id"], await self.tools.dispatch(call)

    def _manage_context(self) -> None:
        if self.config.context == "discard_all" and len(self.messages) > 2 and \
                self.count_tokens(self.messages) > self.config.context_max_tokens:
            del self.messages[2:]
            self.context_resets += 1

    async def run(self) -> Agent:
        cfg = self.config
        schemas = self.tools.schemas() or None
        while self.steps < self.max_steps:
            self._manage_context()
            try:
                result = await self.client.chat(self.messages, tools=schemas, temperature=cfg.temperature,
                                                top_p=cfg.top_p, max_tokens=cfg.max_tokens)
                message = _clean_assistant(result.message)
            except asyncio.CancelledError:
                raise
            except ClientError as e:
                self.status, self.error = "error", f"the model backend failed: {e}"
                return self
            except Exception as e:  # noqa: BLE001 - garbage from the backend ends this agent, not the episode
                self.status = "error"
                self.error = f"the model answered something that is not an assistant turn ({type(e).__name__}: {e})"
                return self
            self.steps += 1
            self.messages.append(message)
            calls = message.get("tool_calls") or []
            invalid = [c for c in result.message.get("invalid_tool_calls") or () if isinstance(c, dict)]
            if calls or invalid:
                self.tool_calls += len(calls) + len(invalid)
                results = await asyncio.gather(*(self._call(c) for c in calls))
                self.messages += [tool_message(cid, res) for cid, res in results]
                self.messages += [tool_message(c.get("id") or f"invalid:{k}",
                                               ToolResult(error=f"malformed tool call: {c.get('error')}"))
                                  for k, c in enumerate(invalid)]
            if self.after_turn is not None:
                self.after_turn(self.steps, calls)
            if not (calls or invalid):
                self.answer, self.status = message.get("content") or "", "done"
                return self
            if self.out_of_budget is not None and self.out_of_budget():
                self.status = "budget"
                return self
        self.status = "step_limit"
        return self
