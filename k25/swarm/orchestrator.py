"""The Agent Swarm runtime: an orchestrator with `create_subagent` / `assign_task`, frozen subagents.

`run_swarm` runs one episode: the orchestrator (any `ChatClient`) gets the task, the environment's tools and
the two swarm tools of Appendix E. `create_subagent{name, system_prompt}` registers a configuration;
`assign_task{agent, prompt}` runs a fresh subagent with that system prompt on `prompt` through the frozen
subagent policy (another `ChatClient`) with the environment's tools (but not the swarm tools) and returns
its final message as the call's result. All calls of one orchestrator turn run concurrently, so a turn with
several `assign_task` calls is one parallel wave. A subagent that errors, times out, hits its step limit
or answers nothing comes back as an `Error: ...` tool result naming the failure; the episode goes on.

Every episode leaves an `EpisodeTrace` whose `stages` (one per orchestrator turn: `main_steps` = 1 and
`sub_steps` = the step counts of the subagents run in that turn) give `critical_steps`.
`run_single` is the single-agent baseline on the same loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from k25.infer.client import ChatClient
from k25.swarm.agent import Agent
from k25.swarm.config import SwarmConfig
from k25.swarm.critical import critical_steps
from k25.swarm.prompts import ASSIGN_TASK, CREATE_SUBAGENT, ORCHESTRATOR_SYSTEM_PROMPT, search_system_prompt
from k25.tools.base import Tool, ToolResult


@dataclasses.dataclass
class EpisodeTrace:
    """What one episode did. `stages[t]` = {"main_steps", "sub_steps", "tool_calls", "subagents"}; each
    subagent record = {"agent", "prompt", "steps", "tool_calls", "status", "error", "answer"} (+ "messages"
    when kept)."""

    mode: str  # "swarm" | "single"
    task: str
    answer: str = ""
    status: str = "running"  # done | step_limit | budget | error | timeout
    error: str | None = None
    stages: list[dict] = dataclasses.field(default_factory=list)
    context_resets: int = 0
    messages: list[dict] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0

    @property
    def critical_steps(self) -> int:
        return critical_steps(self.stages)

    @property
    def main_steps(self) -> int:
        return sum(s["main_steps"] for s in self.stages)

    @property
    def subagents(self) -> list[dict]:
        return [r for s in self.stages for r in s["subagents"]]

    @property
    def total_steps(self) -> int:
        return self.main_steps + sum(r["steps"] for r in self.subagents)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(critical_steps=self.critical_steps, main_steps=self.main_steps, total_steps=self.total_steps,
                 num_subagents=len(self.subagents))
        return d


class _SwarmTool(Tool):
    """A swarm tool bound to one episode's session; name, description and parameters from Appendix E."""

    def __init__(self, spec: dict, session: SwarmSession) -> None:
        self.name, self.description, self.parameters = spec["name"], spec["description"], spec["parameters"]
        self.session = session


class CreateSubagent(_SwarmTool):
    async def call(self, arguments: Mapping[str, Any]) -> ToolResult:
        name, prompt = arguments["name"].strip(), arguments["system_prompt"]
        agents = self.session.agents
        if not name:
            return ToolResult(error="create_subagent: 'name' must not be empty")
        if name in agents:
            return ToolResult(error=f"create_subagent: an agent named {name!r} already exists; reuse it with "
                                    f"assign_task or pick another name")
        if len(agents) >= self.session.config.max_subagents:
            return ToolResult(error=f"create_subagent: at most {self.session.config.max_subagents} subagents per "
                                    f"episode; reuse one of {sorted(agents)}")
        agents[name] = prompt
        return ToolResult(text=f"Created subagent {name!r}. Assign it tasks with assign_task(agent={name!r}, ...).")


class AssignTask(_SwarmTool):
    async def call(self, arguments: Mapping[str, Any]) -> ToolResult:
        name, prompt = arguments["agent"].strip(), arguments["prompt"]
        session = self.session
        if name not in session.agents:
            return ToolResult(error=f"assign_task: no subagent named {name!r}; create it first with "
                                    f"create_subagent (existing: {sorted(session.agents)})")
        cfg = session.config
        max_steps = cfg.sub_max_steps
        if cfg.max_critical_steps is not None:  # keep one step for the orchestrator's answer after the wave
            left = cfg.max_critical_steps - session.spent() - 1
            if left < 1:
                return ToolResult(error=f"assign_task: the critical-step budget ({cfg.max_critical_steps}) leaves no "
                                        f"step for a subagent; answer with what you have")
            max_steps = min(max_steps, left)
        if session.launched >= cfg.max_assignments:
            return ToolResult(error=f"assign_task: this episode has used all {cfg.max_assignments} assignments")
        session.launched += 1
        agent = Agent(session.subagent, session.agents[name], prompt, session.env_tools, max_steps=max_steps,
                      config=cfg)
        record: dict[str, Any] = {"agent": name, "prompt": prompt}
        session.pending.append(record)  # before the first await: records keep the order of the calls
        try:
            async with session.slots:  # the wall-clock limit covers the run, not the wait for a slot
                await asyncio.wait_for(agent.run(), timeout=cfg.sub_timeout_s)
        except TimeoutError:
            agent.status, agent.error = "timeout", f"timed out after {cfg.sub_timeout_s:g} s"
        if agent.status == "done" and not agent.answer.strip():
            agent.status, agent.error = "error", "returned an empty answer"
        elif agent.status == "step_limit":
            agent.error = f"reached its step limit ({max_steps} steps) without a final answer"
        record.update(steps=agent.steps, tool_calls=agent.tool_calls, status=agent.status, error=agent.error,
                      answer=agent.answer, context_resets=agent.context_resets)
        if session.keep_messages:
            record["messages"] = agent.messages
        if agent.status != "done":
            return ToolResult(error=f"task failed: subagent {name!r} {agent.error}")
        return ToolResult(text=agent.answer)


class SwarmSession:
    """Per-episode state of the swarm tools: the created agents and the subagent runs of the current turn.

    `tools()` are `create_subagent` and `assign_task` bound to this session; after each orchestrator turn,
    `stage(calls)` turns the runs that turn launched into its trace stage. `spent()` reports the critical
    steps spent so far, the current turn included (for `SwarmConfig.max_critical_steps`). Used by `run_swarm`
    and by PARL's token-level environment (k25/swarm/parl.py).
    """

    def __init__(self, subagent: ChatClient, tools: Sequence, config: SwarmConfig, keep_messages: bool = False
                 ) -> None:
        self.subagent, self.env_tools, self.config, self.keep_messages = subagent, list(tools), config, keep_messages
        self.agents: dict[str, str] = {}
        self.pending: list[dict] = []
        self.launched = 0
        self.slots = asyncio.Semaphore(config.max_concurrent_subagents)
        self.spent: Callable[[], int] = lambda: 1

    def tools(self) -> list[Tool]:
        return [CreateSubagent(CREATE_SUBAGENT, self), AssignTask(ASSIGN_TASK, self)]

    def stage(self, calls: Sequence[dict]) -> dict:
        runs, self.pending = self.pending, []
        return {"main_steps": 1, "sub_steps": [r["steps"] for r in runs],
                "tool_calls": [(c.get("function") or {}).get("name") for c in calls], "subagents": runs}


def _budget(trace: EpisodeTrace, config: SwarmConfig):
    if config.max_critical_steps is None:
        return None
    return lambda: trace.critical_steps >= config.max_critical_steps


async def _episode(agent: Agent, trace: EpisodeTrace, timeout_s: float) -> EpisodeTrace:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(agent.run(), timeout=timeout_s)
    except TimeoutError:
        agent.status, agent.error = "timeout", f"episode timed out after {timeout_s:g} s"
    trace.wall_s = time.perf_counter() - start
    trace.answer, trace.status, trace.error = agent.answer, agent.status, agent.error
    trace.context_resets, trace.messages = agent.context_resets, agent.messages
    return trace


async def run_swarm(task: str, *, orchestrator: ChatClient, subagent: ChatClient, tools: Sequence[Tool] = (),
                    config: SwarmConfig | None = None, system_prompt: str = ORCHESTRATOR_SYSTEM_PROMPT,
                    keep_messages: bool = False) -> EpisodeTrace:
    """One Agent Swarm episode on `task`; `tools` are the environment's (given to orchestrator and subagents)."""
    config = config or SwarmConfig()
    session = SwarmSession(subagent, tools, config, keep_messages)
    trace = EpisodeTrace(mode="swarm", task=task)

    def after_turn(step: int, calls: list[dict]) -> None:
        trace.stages.append(session.stage(calls))

    session.spent = lambda: trace.critical_steps + 1
    agent = Agent(orchestrator, system_prompt, task, [*tools, *session.tools()], max_steps=config.main_max_steps,
                  config=config, after_turn=after_turn, out_of_budget=_budget(trace, config))
    return await _episode(agent, trace, config.episode_timeout_s)


async def run_single(task: str, *, agent: ChatClient, tools: Sequence[Tool] = (), config: SwarmConfig | None = None,
                     system_prompt: str | None = None) -> EpisodeTrace:
    """The single-agent baseline: one agent with the environment's tools, `config.single_max_steps` steps,
    Appendix E's agentic-search system prompt by default."""
    config = config or SwarmConfig()
    if system_prompt is None:
        system_prompt = search_system_prompt(datetime.date.today().isoformat())
    trace = EpisodeTrace(mode="single", task=task)

    def after_turn(step: int, calls: list[dict]) -> None:
        trace.stages.append({"main_steps": 1, "sub_steps": [],
                             "tool_calls": [(c.get("function") or {}).get("name") for c in calls],
                             "subagents": []})

    loop = Agent(agent, system_prompt, task, tools, max_steps=config.single_max_steps, config=config,
                 after_turn=after_turn, out_of_budget=_budget(trace, config))
    return await _episode(loop, trace, config.episode_timeout_s)
