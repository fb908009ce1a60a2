"""Wide search (and the swarm's deep search / long-document tasks) as an inspect task.

    inspect eval k25/swarm_search -T kind=wide_search -T n=4 --model openai/NAME -M responses_api=false

Each sample is one held-out task of `k25.swarm.tasks.SwarmEnv`; the solver runs the swarm's own episode
(`k25.swarm.evaluate.run_task`: the orchestrator with create_subagent / assign_task, subagents, the offline
search tools, step limits) with inspect's model behind a ChatClient adapter, so the scores are the ones
`experiments.swarm_run` reports for the same model: item/row F1 and success, critical steps, subagents.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import GenerateConfig, Model, ModelOutput, get_model, messages_from_openai
from inspect_ai.scorer import Metric, SampleScore, Score, Target, metric, scorer
from inspect_ai.solver import Generate, Solver, TaskState, solver
from inspect_ai.tool import ToolInfo, ToolParams

from k25.infer.client import ChatResult, assistant_message

KINDS = ("wide_search", "deep_search", "long_doc")
SCORE_KEYS = ("item_f1", "row_f1", "success", "critical_steps", "subagents")


class InspectChatClient:
    """A ChatClient over an inspect Model, so code written against ChatClient (the swarm's orchestrator and
    subagents) runs on whatever `--model` the eval was given, with inspect's logging and retries."""

    def __init__(self, model: Model) -> None:
        self.inspect_model = model
        self.model = str(model)

    async def chat(self, messages: Sequence[dict], *, tools: Sequence[dict] | None = None, temperature: float = 1.0,
                   top_p: float = 1.0, max_tokens: int = 512, seed: int | None = None,
                   stop: Sequence[str] | None = None, chat_template_kwargs: dict | None = None) -> ChatResult:
        infos = [ToolInfo(name=t["function"]["name"], description=t["function"].get("description", ""),
                          parameters=ToolParams(**t["function"].get("parameters", {})))
                 for t in tools or ()]
        config = GenerateConfig(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                stop_seqs=list(stop) if stop else None)
        out: ModelOutput = await self.inspect_model.generate(await messages_from_openai(list(messages)),
                                                             tools=infos, config=config)
        msg = out.message
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.function, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                 for c in msg.tool_calls or []]
        reasoning = "".join(c.reasoning for c in msg.content if c.type == "reasoning") \
            if not isinstance(msg.content, str) else None
        return ChatResult(assistant_message(msg.text, tool_calls=calls, reasoning_content=reasoning or None),
                          "tool_calls" if calls else ("length" if out.stop_reason == "max_tokens" else "stop"))


@functools.lru_cache(maxsize=4)
def _env(seed: int):
    from k25.swarm.tasks import SwarmEnv

    return SwarmEnv(seed)


def _tasks(kind: str, seed: int, n: int) -> dict[str, Any]:
    return {t.task_id: t for t in _env(seed).tasks(kind, "heldout", n)}


@solver
def swarm_episode(kind: str, seed: int, n: int, single_agent: bool, benchmark: str) -> Solver:
    async def solve(state: TaskState, generate: Generate) -> TaskState:
        from k25.swarm.config import SwarmConfig
        from k25.swarm.evaluate import run_task

        swarm_task = _tasks(kind, seed, n)[str(state.sample_id)]
        client = InspectChatClient(get_model())
        row, trace = await run_task(swarm_task, _env(seed).tools(), orchestrator=client, single_agent=single_agent,
                                    config=SwarmConfig.for_benchmark(benchmark))
        state.metadata["swarm"] = row
        state.output = ModelOutput.from_content(client.model, trace.answer or "")
        return state

    return solve


@metric
def swarm_means() -> Metric:
    def compute(scores: list[SampleScore]) -> dict[str, float]:
        out = {}
        for key in SCORE_KEYS:
            vals = [s.score.value[key] for s in scores if isinstance(s.score.value, dict) and key in s.score.value]
            if vals:
                out[key] = float(np.mean(vals))
        return out

    return compute


@scorer(metrics=[swarm_means()])
def swarm_scorer():
    async def score(state: TaskState, target: Target) -> Score:
        row = state.metadata["swarm"]
        return Score(value={k: float(row[k]) for k in SCORE_KEYS if k in row}, answer=state.output.completion,
                     metadata=row)

    return score


@task
def swarm_search(kind: str = "wide_search", n: int = 4, seed: int = 0, single_agent: bool = False,
                 benchmark: str = "widesearch") -> Task:
    """`n` held-out `kind` tasks (wide_search, deep_search, long_doc) of the swarm's offline world `seed`."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    samples = [Sample(id=tid, input=t.prompt, metadata={"kind": kind}) for tid, t in _tasks(kind, seed, n).items()]
    return Task(dataset=MemoryDataset(samples, name=f"swarm_{kind}"), scorer=swarm_scorer(),
                solver=swarm_episode(kind, seed, n, single_agent, benchmark))
