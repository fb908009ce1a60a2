"""The unified agentic environment (Appendix D): a Gym-like episode over token ids, a Toolset and a Judge.

`AgentEnv.reset(task)` returns the prompt as token ids; `await env.step(action)` takes the token ids the
policy generated for one assistant turn (exactly as the sampler returned them), parses them, runs the tool
calls through the Toolset, and returns `(observation, reward, done, info)` where the observation is the
token ids the environment appends before the policy's next turn: the chat format's rendering of the tool
results followed by the next assistant header. Text is never re-tokenised on the policy's side: a multi-turn
trajectory is the concatenation prompt + action_1 + observation_1 + action_2 + ..., every action token being
the sampler's own id, every observation token rendered once by the format (loss mask 0).

The episode ends when the policy answers without a tool call, after `max_turns` assistant turns, or when a
turn is cut off (no stop id at its end); then the Judge scores the final assistant message. Tool failures
(an unknown tool, bad arguments, an exception, a hang past `tool_timeout_s`) come back to the model as tool
messages with the error; they never end the episode.

Two turn formats: `ChatTurns` (the Kimi chat format, k25.data.chat, with tools) and `PlainTurns` (bos +
prompt, answer up to eos: the completion format the `lm` stage trains on, for single-turn tasks).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from k25.data.chat import ChatFormat
from k25.data.sft.records import image_part
from k25.rl.media import MediaStore, message_images
from k25.rl.rewards import GRMJudge, RewardResult, RewardSpec, compute_reward
from k25.tools.base import ToolResult, Toolset

Message = dict[str, Any]


@dataclasses.dataclass
class Task:
    """One prompt: `messages` (the conversation before the first assistant turn), the `target` the rule rewards
    compare with (JSON-able), an optional per-task reward `spec` (else the judge's default) and GRM reference.
    `id` keys Toggle's budgets and the rollout groups."""

    id: str
    messages: list[Message]
    target: Any = None
    spec: Mapping[str, Any] | None = None  # RewardSpec fields; None: the judge's default spec
    reference: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        return cls(**dict(d))


class TurnFormat(Protocol):
    """How the environment turns messages into token ids and generated ids back into a message."""

    stop_ids: tuple[int, ...]

    def prompt_ids(self, messages: Sequence[Message], tools: Sequence[dict] | None) -> list[int]: ...

    def parse(self, ids: Sequence[int]) -> Message: ...

    def observation_ids(self, messages: Sequence[Message]) -> list[int]: ...


class ChatTurns:
    """The Kimi chat format. `observation_ids(tool_messages)` renders those messages and the next generation
    header on their own; since the format renders message by message, prompt + actions + observations equal
    `chat.encode(whole conversation)` whenever the sampled ids are the tokenizer's own encoding of their text
    (checked in tests/rl/test_env.py). With `media` (a k25.rl.media.MediaStore) image parts render as their
    merged vision tokens' placeholders, for a K2.5 policy."""

    def __init__(self, chat: ChatFormat, *, thinking: bool = False, media: MediaStore | None = None):
        self.chat, self.thinking, self.media = chat, thinking, media
        self.stop_ids = tuple(chat.stop_ids)

    def _encode(self, messages, tools) -> list[int]:
        urls = message_images(messages) if self.media is not None else []
        tokens = [self.media.tokens(u) for u in urls] if urls else None
        return self.chat.encode(messages, tools, add_generation_prompt=True, thinking=self.thinking,
                                image_tokens=tokens).ids

    def prompt_ids(self, messages, tools):
        return self._encode(messages, tools)

    def parse(self, ids):
        return self.chat.parse(ids, thinking=self.thinking)

    def observation_ids(self, messages):
        return self._encode(messages, None)


class PlainTurns:
    """bos + the last user message's text; the answer is everything up to eos. Single-turn, no tools: the
    format of the synthetic tasks the `lm` stage pre-trains on (k25/data/synthetic/text.py)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.stop_ids = (int(tokenizer.eos_id),)

    def prompt_ids(self, messages, tools):
        if tools:
            raise ValueError("PlainTurns has no tool syntax; use ChatTurns for tasks with tools")
        user = [m for m in messages if m.get("role") == "user"]
        if not user or not isinstance(user[-1].get("content"), str):
            raise ValueError("PlainTurns needs a user message with string content as the prompt")
        return [int(self.tokenizer.bos_id)] + list(self.tokenizer.encode(user[-1]["content"]))

    def parse(self, ids):
        ids = [int(i) for i in ids]
        if self.stop_ids[0] in ids:
            ids = ids[: ids.index(self.stop_ids[0])]
        return {"role": "assistant", "content": self.tokenizer.decode(ids), "reasoning_content": None}

    def observation_ids(self, messages):
        raise ValueError("PlainTurns episodes are single-turn: there is no observation after the answer")


class Judge(Protocol):
    """Scores the episode's final assistant message."""

    async def __call__(self, task: Task, response: Message, messages: Sequence[Message]) -> RewardResult: ...


class RewardJudge:
    """The rewards of k25.rl.rewards as a Judge: the task's spec (or `spec`), rule terms on the final message's
    content against `task.target`, the GRM (`grm`) on the first user message and the content."""

    def __init__(self, spec: RewardSpec | Mapping[str, Any], grm: GRMJudge | None = None):
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.from_mapping(spec)
        self.grm = grm

    async def __call__(self, task, response, messages):
        spec = self.spec if task.spec is None else RewardSpec.from_mapping(task.spec)
        prompt = next((m.get("content") for m in messages if m.get("role") == "user"), "") or ""
        return await compute_reward(spec, response.get("content") or "", task.target,
                                    prompt=prompt if isinstance(prompt, str) else str(prompt), judge=self.grm,
                                    reference=task.reference)


class AgentEnv:
    """One episode at a time (see the module docstring). Reusable: `reset` starts the next episode."""

    def __init__(self, fmt: TurnFormat, judge: Judge, toolset: Toolset | None = None, *, max_turns: int = 4,
                 tool_timeout_s: float = 30.0, max_tool_chars: int = 2000, replay_tools: bool = False,
                 toolset_factory: Callable[[Task], Toolset] | None = None, tool_schemas: list[dict] | None = None,
                 tool_images: int = 0):
        """`toolset_factory(task)`: a fresh toolset per episode (tools bound to the task, e.g. a Python session
        holding its images), closed when the episode ends; `tool_schemas`: the declaration the prompt shows
        (default: the toolset's own); `tool_images`: images per tool result passed back as image parts (for a
        policy that sees them; 0 = text only)."""
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns} must be >= 1")
        if toolset is not None and toolset_factory is not None:
            raise ValueError("give AgentEnv either a toolset or a toolset_factory, not both")
        self.fmt, self.judge, self.toolset = fmt, judge, toolset
        self.max_turns, self.tool_timeout_s, self.max_tool_chars = max_turns, tool_timeout_s, max_tool_chars
        self.replay_tools = replay_tools  # stateful tools (a Python session): rebuild them on `restore`
        self.toolset_factory, self.tool_schemas, self.tool_images = toolset_factory, tool_schemas, int(tool_images)
        self.task: Task | None = None
        self.messages: list[Message] = []
        self.turns = 0
        self.done = True

    @property
    def tools(self) -> list[dict] | None:
        if self.tool_schemas is not None and (self.toolset is not None or self.toolset_factory is not None):
            return list(self.tool_schemas)
        return self.toolset.schemas() if self.toolset is not None and len(self.toolset) else None

    def media(self) -> list[str]:
        """The image references of the episode so far (prompt, then tool results), in rendering order."""
        return message_images(self.messages)

    def _episode_tools(self, task: Task) -> None:
        if self.toolset_factory is not None:
            if self.toolset is not None:
                self.toolset.close()
            self.toolset = self.toolset_factory(task)

    def _end_episode_tools(self) -> None:
        if self.toolset_factory is not None and self.toolset is not None:
            self.toolset.close()
            self.toolset = None

    def reset(self, task: Task) -> list[int]:
        """Start an episode on `task`; the observation is the prompt's token ids."""
        self.task, self.messages, self.turns, self.done = task, [dict(m) for m in task.messages], 0, False
        self._episode_tools(task)
        return self.fmt.prompt_ids(self.messages, self.tools)

    def cut_off(self) -> dict[str, float]:
        """End the episode because the rollout has no room for the environment's last reply (the episode scores
        0 there); returns the reward components to log for it, {} when the environment has none."""
        self.done = True
        self._end_episode_tools()
        return {}

    async def step(self, action: Sequence[int]) -> tuple[list[int], float, bool, dict[str, Any]]:
        """One assistant turn (its generated ids) -> (observation ids, reward, done, info)."""
        if self.done or self.task is None:
            raise RuntimeError("step() on a finished episode; call reset(task) first")
        msg = self.fmt.parse(action)
        invalid = msg.pop("invalid_tool_calls", None) or []
        self.messages.append(msg)
        self.turns += 1
        truncated = not action or int(action[-1]) not in self.fmt.stop_ids
        calls = list(msg.get("tool_calls") or [])
        info: dict[str, Any] = {"turn": self.turns, "tool_calls": len(calls) + len(invalid), "tool_errors": 0,
                                "truncated": truncated}
        if truncated or not (calls or invalid) or self.turns >= self.max_turns or self.toolset is None:
            self.done = True
            self._end_episode_tools()
            result = await self.judge(self.task, msg, self.messages)
            info.update(components=result.components, gated=result.gated, judge_failed=result.judge_failed)
            return [], float(result.reward), True, info
        results = await asyncio.gather(*(self._run_call(c) for c in calls))
        results += [ToolResult(error=f"malformed tool call: {c.get('error')}") for c in invalid]
        replies = []
        for k, (call, res) in enumerate(zip(calls + invalid, results)):
            info["tool_errors"] += int(not res.ok)
            text = res.content()
            if len(text) > self.max_tool_chars:
                text = text[: self.max_tool_chars] + f"\n[truncated to {self.max_tool_chars} characters]"
            content: Any = text
            if self.tool_images and res.images:
                content = [{"type": "text", "text": text}] + [image_part(im) for im in res.images[:self.tool_images]]
            replies.append({"role": "tool", "tool_call_id": call.get("id") or f"invalid:{k}", "content": content})
        self.messages += replies
        return self.fmt.observation_ids(replies), 0.0, False, info

    async def _run_call(self, call: Mapping[str, Any]) -> ToolResult:
        try:
            return await asyncio.wait_for(self.toolset.dispatch(call), self.tool_timeout_s)
        except TimeoutError:
            return ToolResult(error=f"the tool call timed out after {self.tool_timeout_s:g} s")

    # -------------------------------------------------------------------------------- partial rollouts
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state of the running episode (a partial rollout carries it to the next iteration)."""
        return {"task": None if self.task is None else self.task.to_dict(), "messages": self.messages,
                "turns": self.turns, "done": self.done}

    async def restore(self, state: Mapping[str, Any]) -> None:
        """Continue an episode from `state_dict()` on this (possibly fresh) environment. With `replay_tools`,
        the recorded tool calls run again in order (outputs discarded) to rebuild stateful tools."""
        self.task = Task.from_dict(state["task"])
        self.messages, self.turns, self.done = [dict(m) for m in state["messages"]], state["turns"], state["done"]
        self._episode_tools(self.task)
        if self.replay_tools and self.toolset is not None:
            for m in self.messages:
                for call in m.get("tool_calls") or () if m.get("role") == "assistant" else ():
                    await self._run_call(call)

    def close(self) -> None:
        if self.toolset is not None:
            self.toolset.close()
