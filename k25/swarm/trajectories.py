"""Orchestrator SFT data: scripted Agent Swarm episodes as chat records, the warm-up of chat-format PARL.

A chat-format orchestrator (`config.parl.env="chat"`) must write Appendix E's `create_subagent` /
`assign_task` calls before PARL has anything to reward, and a model that has never seen them almost never
does. The warm-up is the `sft` stage on what the scripted orchestrator (k25.swarm.policies) does on training
tasks: each record is its whole conversation (system prompt, task, its tool calls, the subagents' final
messages as tool results, its answer) with the tool declarations it was given, so the assistant turns are
the behaviour cloned and everything else is context, exactly as `ParlEnv` renders an episode.
"""

from __future__ import annotations

import asyncio

from k25.data.sft.records import Record
from k25.infer.client import ScriptedClient
from k25.swarm.config import SwarmConfig
from k25.swarm.orchestrator import SwarmSession, run_swarm
from k25.swarm.policies import scripted_policy
from k25.swarm.prompts import ORCHESTRATOR_PROMPTS
from k25.swarm.tasks import SwarmEnv, SwarmTask
from k25.tools.base import Toolset


def tool_schemas(env: SwarmEnv, prompt: str = "appendix_e") -> list[dict]:
    """The declarations the orchestrator of prompt variant `prompt` sees (`ORCHESTRATOR_PROMPTS`): the
    environment's tools (unless the variant drops them), then the swarm tools."""
    session = SwarmSession(ScriptedClient(scripted_policy()), env.tools(), SwarmConfig())
    own = env.tools() if ORCHESTRATOR_PROMPTS[prompt][1] else []
    return Toolset([*own, *session.tools()]).schemas()


def episode_record(env: SwarmEnv, task: SwarmTask, prompt: str = "appendix_e") -> Record:
    """The scripted orchestrator's episode on `task` as a chat record {"messages", "tools"}, rendered as
    `ParlEnv` renders it for the orchestrator prompt variant `prompt`."""
    if prompt not in ORCHESTRATOR_PROMPTS:
        raise ValueError(f"orchestrator prompt {prompt!r}: one of {sorted(ORCHESTRATOR_PROMPTS)}")
    policy = ScriptedClient(scripted_policy())
    trace = asyncio.run(run_swarm(task.prompt, orchestrator=policy, subagent=policy, tools=env.tools(),
                                  system_prompt=ORCHESTRATOR_PROMPTS[prompt][0]))
    if trace.status != "done":
        raise RuntimeError(f"the scripted orchestrator did not finish {task.task_id}: {trace.status} {trace.error}")
    calls = {c["function"]["name"] for m in trace.messages for c in m.get("tool_calls") or ()}
    if not ORCHESTRATOR_PROMPTS[prompt][1] and calls - {"create_subagent", "assign_task"}:
        raise ValueError(f"the scripted orchestrator used {sorted(calls)} on {task.task_id}, which prompt variant "
                         f"{prompt!r} does not declare")
    return {"messages": trace.messages, "tools": tool_schemas(env, prompt)}


def orchestrator_records(n: int, seed: int = 0, *, prompt: str = "appendix_e", world_seed: int = 0
                         ) -> list[Record]:
    """`n` records on deep-search training tasks: the first `n` of the training stream `seed` (the stream the
    PARL stage trains on is 0; the sft stage's held-out conversations use seed + 1, another stream of
    questions over the same training companies)."""
    if n < 1:
        raise ValueError(f"orchestrator_records: n={n} must be >= 1")
    env = SwarmEnv(world_seed)
    return [episode_record(env, t, prompt) for t in env.tasks("deep_search", "train", n, stream=seed)]
