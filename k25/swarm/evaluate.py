"""Run the swarm (or the single-agent baseline) over a list of offline tasks and summarise.

Shared by `experiments.swarm_run` (any OpenAI-compatible model) and the swarm experiments. Episodes run
concurrently up to `concurrency`; each is bounded by `SwarmConfig.episode_timeout_s`.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence

from k25.infer.client import ChatClient
from k25.swarm.config import SwarmConfig
from k25.swarm.orchestrator import EpisodeTrace, run_single, run_swarm
from k25.swarm.tasks import SwarmTask


async def run_task(task: SwarmTask, tools, *, orchestrator: ChatClient, subagent: ChatClient | None = None,
                   single_agent: bool = False, config: SwarmConfig | None = None, keep_messages: bool = False
                   ) -> tuple[dict, EpisodeTrace]:
    """One episode on `task`; returns (its scores and costs, its trace)."""
    if single_agent:
        trace = await run_single(task.prompt, agent=orchestrator, tools=tools, config=config)
    else:
        trace = await run_swarm(task.prompt, orchestrator=orchestrator, subagent=subagent or orchestrator,
                                tools=tools, config=config, keep_messages=keep_messages)
    row = {"task_id": task.task_id, "kind": task.kind, "status": trace.status, **task.score(trace.answer),
           "critical_steps": trace.critical_steps, "main_steps": trace.main_steps,
           "total_steps": trace.total_steps, "subagents": len(trace.subagents),
           "failed_subagents": sum(r["status"] != "done" for r in trace.subagents), "wall_s": trace.wall_s}
    return row, trace


def summarize(rows: Sequence[dict]) -> dict:
    """Means per metric over episodes (item_f1 / row_f1 over wide-search episodes only)."""
    def mean(key, subset=rows):
        vals = [r[key] for r in subset if key in r]
        return statistics.fmean(vals) if vals else None

    return {"episodes": len(rows), "item_f1": mean("item_f1"), "row_f1": mean("row_f1"),
            "success": mean("success"), "critical_steps": mean("critical_steps"), "main_steps": mean("main_steps"),
            "total_steps": mean("total_steps"), "subagents_per_episode": mean("subagents"),
            "failed_subagents_per_episode": mean("failed_subagents"),
            "unfinished": sum(r["status"] != "done" for r in rows)}


async def evaluate(tasks: Sequence[SwarmTask], tools, *, orchestrator: ChatClient, subagent: ChatClient | None = None,
                   single_agent: bool = False, config: SwarmConfig | None = None, concurrency: int = 4,
                   keep_messages: bool = False) -> tuple[list[dict], list[EpisodeTrace]]:
    """Every task once; results in task order. `keep_messages` keeps each subagent's conversation in the trace."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)

    async def one(task):
        async with gate:
            return await run_task(task, tools, orchestrator=orchestrator, subagent=subagent,
                                  single_agent=single_agent, config=config, keep_messages=keep_messages)

    done = await asyncio.gather(*(one(t) for t in tasks))
    return [r for r, _ in done], [t for _, t in done]
