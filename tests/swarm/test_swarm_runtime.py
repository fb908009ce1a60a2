"""The swarm runtime: Appendix E tools, concurrent waves, one tool message per call, failures as tool errors,
step limits, timeouts and discard-all context management."""

import asyncio
import json
import time

import pytest

from k25.infer.client import ScriptedClient, assistant_message
from k25.swarm import BENCHMARK_STEP_LIMITS, SwarmConfig, critical_steps, run_single, run_swarm
from k25.swarm.prompts import ASSIGN_TASK, CREATE_SUBAGENT
from k25.tools.base import Tool, ToolResult


class InFlight:
    """Wraps a client and counts how many of its calls are running at once."""

    def __init__(self, client):
        self.client, self.model, self.now, self.peak, self.calls = client, client.model, 0, 0, 0

    async def chat(self, messages, **kw):
        self.now += 1
        self.calls += 1
        self.peak = max(self.peak, self.now)
        try:
            return await self.client.chat(messages, **kw)
        finally:
            self.now -= 1


def user_text(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


def wave_orchestrator(prompts, agent="w"):
    """create_subagent, then one turn assigning every prompt, then an answer joining the tool results."""
    def fn(messages, tools):
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        if n_assistant == 0:
            return assistant_message(None, tool_calls=[("create_subagent", {"name": "w", "system_prompt": "work"})])
        if n_assistant == 1:
            return assistant_message(None, tool_calls=[("assign_task", {"agent": agent, "prompt": p}) for p in prompts])
        return " || ".join(m["content"] for m in messages if m["role"] == "tool")
    return fn


def test_tool_schemas_are_appendix_e():
    assert CREATE_SUBAGENT["name"] == "create_subagent" and ASSIGN_TASK["name"] == "assign_task"
    assert CREATE_SUBAGENT["parameters"]["required"] == ["name", "system_prompt"]
    assert ASSIGN_TASK["parameters"]["required"] == ["agent", "prompt"]
    for spec in (CREATE_SUBAGENT, ASSIGN_TASK):
        props = spec["parameters"]["properties"]
        assert set(props) == set(spec["parameters"]["required"])
        assert all(p["type"] == "string" for p in props.values())
    assert BENCHMARK_STEP_LIMITS == {"browsecomp": (15, 100), "widesearch": (100, 100), "inhouse": (100, 50)}
    cfg = SwarmConfig.for_benchmark("browsecomp")
    assert (cfg.main_max_steps, cfg.sub_max_steps) == (15, 100)
    with pytest.raises(ValueError, match="unknown benchmark"):
        SwarmConfig.for_benchmark("gaia")
    with pytest.raises(ValueError, match="SwarmConfig.context"):
        SwarmConfig(context="summarise")
    with pytest.raises(ValueError, match="sub_max_steps"):
        SwarmConfig(sub_max_steps=0)


def test_subagents_of_one_turn_run_concurrently():
    n = 8
    prompts = [f"job {i}" for i in range(n)]
    seen_tools = []

    def sub_fn(messages, tools):
        seen_tools.append(sorted(t["function"]["name"] for t in tools or ()))
        return f"result of {user_text(messages)}"

    sub = InFlight(ScriptedClient(sub_fn, delay_s=1.0))
    orch = ScriptedClient(wave_orchestrator(prompts))
    start = time.perf_counter()
    trace = asyncio.run(run_swarm("do 8 jobs", orchestrator=orch, subagent=sub, tools=[Echo()]))
    wall = time.perf_counter() - start
    assert sub.calls == n and sub.peak == n  # all eight were in flight together
    assert wall < n * 1.0 / 2  # ~1 s, not 8 s
    assert trace.status == "done"
    assert seen_tools == [["echo"]] * n  # subagents get the environment's tools, not the swarm tools
    # one tool message per call id, in call order, right after the assigning turn
    msgs = trace.messages
    turn = next(i for i, m in enumerate(msgs) if any(c["function"]["name"] == "assign_task"
                                                     for c in m.get("tool_calls", [])))
    ids = [c["id"] for c in msgs[turn]["tool_calls"]]
    replies = msgs[turn + 1: turn + 1 + n]
    assert [m["role"] for m in replies] == ["tool"] * n and [m["tool_call_id"] for m in replies] == ids
    assert [m["content"] for m in replies] == [f"result of {p}" for p in prompts]
    # stages: create, the wave (8 subagents of 1 step each), the answer
    assert [s["sub_steps"] for s in trace.stages] == [[], [1] * n, []]
    assert trace.critical_steps == critical_steps(trace.stages) == 1 + (1 + 1) + 1
    assert trace.total_steps == 3 + n and len(trace.subagents) == n
    json.dumps(trace.to_dict())  # the trace is plain data


class Echo(Tool):
    name = "echo"
    description = "Echo the text back."
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    async def call(self, arguments):
        return ToolResult(text=arguments["text"])


def test_failing_subagents_are_reported_as_failed_tasks():
    prompts = ["ok", "hang", "raise", "empty", "garbage", "loop"]

    async def sub_fn(messages, tools):
        kind = user_text(messages)
        if kind == "hang":
            await asyncio.sleep(60)
        if kind == "raise":
            raise RuntimeError("backend exploded")
        if kind == "empty":
            return ""
        if kind == "garbage":
            return {"content": {"not": "text"}}
        if kind == "loop":
            return assistant_message(None, tool_calls=[("echo", {"text": "again"})])
        return "fine"

    orch_fn = wave_orchestrator(prompts)

    def orch(messages, tools):  # the same wave plus a call to an agent that was never created and bad JSON
        out = orch_fn(messages, tools)
        if isinstance(out, dict) and out["tool_calls"][0]["function"]["name"] == "assign_task":
            out["tool_calls"].append({"id": "x:1", "type": "function",
                                      "function": {"name": "assign_task", "arguments": '{"agent": "ghost", "prompt": "p"}'}})
            out["tool_calls"].append({"id": "x:2", "type": "function",
                                      "function": {"name": "assign_task", "arguments": '{"agent": "w", '}})
        return out

    cfg = SwarmConfig(sub_max_steps=3, sub_timeout_s=0.5, episode_timeout_s=30)
    start = time.perf_counter()
    trace = asyncio.run(run_swarm("t", orchestrator=ScriptedClient(orch), subagent=ScriptedClient(sub_fn),
                                  tools=[Echo()], config=cfg))
    assert time.perf_counter() - start < 10  # the hanging subagent did not hang the episode
    assert trace.status == "done"
    replies = [m["content"] for m in trace.messages if m["role"] == "tool"][1:]  # after create_subagent's
    assert replies[0] == "fine"
    assert "timed out after 0.5 s" in replies[1]
    assert "backend exploded" in replies[2]
    assert "empty answer" in replies[3]
    assert "assistant content must be text" in replies[4]
    assert "step limit (3 steps)" in replies[5]
    assert all(r.startswith("Error: task failed: subagent 'w'") for r in replies[1:6])
    assert "no subagent named 'ghost'" in replies[6] and "not valid JSON" in replies[7]
    statuses = [r["status"] for r in trace.subagents]
    assert statuses == ["done", "timeout", "error", "error", "error", "step_limit"]
    loop = trace.subagents[-1]
    assert loop["steps"] == 3 and loop["tool_calls"] == 3
    assert trace.stages[1]["sub_steps"] == [1, 0, 0, 1, 0, 3]
    assert trace.answer.startswith("create_subagent") is False and "fine" in trace.answer


def test_orchestrator_limits_errors_and_timeouts_end_the_episode():
    def never_done(messages, tools):
        return assistant_message(None, tool_calls=[("create_subagent", {"name": f"a{len(messages)}",
                                                                         "system_prompt": "s"})])
    cfg = SwarmConfig(main_max_steps=5, max_subagents=3)
    trace = asyncio.run(run_swarm("t", orchestrator=ScriptedClient(never_done), subagent=ScriptedClient(str),
                                  config=cfg))
    assert trace.status == "step_limit" and trace.main_steps == 5 and trace.critical_steps == 5
    errors = [m["content"] for m in trace.messages if m["role"] == "tool" and m["content"].startswith("Error")]
    assert len(errors) == 2 and "at most 3 subagents" in errors[0]

    def broken(messages, tools):
        raise ConnectionError("refused")
    trace = asyncio.run(run_swarm("t", orchestrator=ScriptedClient(broken), subagent=ScriptedClient(str)))
    assert trace.status == "error" and "refused" in trace.error and trace.stages == []

    async def slow(messages, tools):
        await asyncio.sleep(60)
    trace = asyncio.run(run_swarm("t", orchestrator=ScriptedClient(slow), subagent=ScriptedClient(str),
                                  config=SwarmConfig(episode_timeout_s=0.3)))
    assert trace.status == "timeout" and "0.3 s" in trace.error


def test_create_subagent_rejects_duplicates_and_empty_names():
    def fn(messages, tools):
        if len(messages) == 2:
            return assistant_message(None, tool_calls=[("create_subagent", {"name": "a", "system_prompt": "s"}),
                                                       ("create_subagent", {"name": "a", "system_prompt": "t"}),
                                                       ("create_subagent", {"name": " ", "system_prompt": "t"}),
                                                       ("create_subagent", {"name": "b"})])
        return "done"
    trace = asyncio.run(run_swarm("t", orchestrator=ScriptedClient(fn), subagent=ScriptedClient(str)))
    replies = [m["content"] for m in trace.messages if m["role"] == "tool"]
    assert replies[0].startswith("Created subagent 'a'")
    assert "already exists" in replies[1] and "must not be empty" in replies[2]
    assert "system_prompt" in replies[3] and "required" in replies[3]


class Big(Tool):
    name = "read"
    description = "Return a long text."
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments):
        return ToolResult(text="x" * 2000)


def test_discard_all_resets_the_context_and_keeps_counting_steps():
    seen = []

    def fn(messages, tools):
        seen.append(len(messages))
        return "answer" if len(seen) == 8 else assistant_message(None, tool_calls=[("read", {})])

    cfg = SwarmConfig(context="discard_all", context_max_tokens=1200, single_max_steps=20)
    trace = asyncio.run(run_single("t", agent=ScriptedClient(fn), tools=[Big()], config=cfg, system_prompt="s"))
    # each read adds ~500 tokens: past 1200 after the third, so the history is dropped before the fourth call
    assert seen == [2, 4, 6, 2, 4, 6, 2, 4]
    assert trace.context_resets == 2 and trace.status == "done" and trace.main_steps == 8
    nothing = asyncio.run(run_single("t", agent=ScriptedClient(fn), tools=[Big()],
                                     config=SwarmConfig(single_max_steps=3), system_prompt="s"))
    assert nothing.status == "step_limit" and nothing.context_resets == 0


def test_critical_step_budget_bounds_orchestrator_and_subagents():
    from k25.swarm.policies import scripted_policy
    from k25.swarm.tasks import SwarmEnv

    env = SwarmEnv(0)
    task = env.tasks("wide_search", "heldout", 1)[0]
    policy = scripted_policy()
    single = asyncio.run(run_single(task.prompt, agent=ScriptedClient(policy), tools=env.tools(),
                                    config=SwarmConfig(max_critical_steps=5)))
    assert single.status == "budget" and single.critical_steps == 5
    cfg = SwarmConfig(max_critical_steps=8)
    swarm = asyncio.run(run_swarm(task.prompt, orchestrator=ScriptedClient(policy), subagent=ScriptedClient(policy),
                                  tools=env.tools(), config=cfg))
    # search+create (1), open the registry (1), a wave whose subagents get 8 - 3 - 1 = 4 steps and cannot finish
    # 4 companies (9 steps), then the retry is refused: no budget is left for a subagent
    assert [s["sub_steps"] for s in swarm.stages][:3] == [[], [], [4] * len(swarm.stages[2]["sub_steps"])]
    assert all(r["status"] == "step_limit" for r in swarm.subagents)
    assert swarm.critical_steps <= 8
    refused = [m["content"] for m in swarm.messages if m["role"] == "tool" and "leaves no step" in m["content"]]
    assert refused
    with pytest.raises(ValueError, match="max_critical_steps"):
        SwarmConfig(max_critical_steps=0)


def test_malformed_tool_calls_are_answered_not_final():
    def fn(messages, tools):
        if len(messages) == 2:
            return {"content": None, "invalid_tool_calls": [
                {"id": None, "type": "function", "function": {"name": None, "arguments": ""},
                 "error": "the tool-call section is not closed"}]}
        return "recovered"
    trace = asyncio.run(run_single("t", agent=ScriptedClient(fn), tools=[Echo()], system_prompt="s"))
    assert trace.status == "done" and trace.answer == "recovered" and trace.main_steps == 2
    assert trace.messages[3] == {"role": "tool", "tool_call_id": "invalid:0",
                                 "content": "Error: malformed tool call: the tool-call section is not closed"}


def test_assignment_cap_and_concurrency_slots():
    prompts = [f"job {i}" for i in range(6)]
    sub = InFlight(ScriptedClient(lambda m, t: "ok", delay_s=0.2))
    cfg = SwarmConfig(max_assignments=5, max_concurrent_subagents=2)
    trace = asyncio.run(run_swarm("t", orchestrator=ScriptedClient(wave_orchestrator(prompts)), subagent=sub,
                                  config=cfg))
    assert sub.calls == 5 and sub.peak == 2  # five run, never more than two at once
    replies = [m["content"] for m in trace.messages if m["role"] == "tool"][1:]
    assert replies[:5] == ["ok"] * 5 and "used all 5 assignments" in replies[5]
    assert trace.stages[1]["sub_steps"] == [1] * 5
