"""Vision tool-use evaluation: held-out image tasks with the Python tool, run as an agent loop.

Per task: the image(s) are shown in the user turn and bound in a fresh `PythonSandbox`; the model (the
in-process sampler behind `SamplerClient`: chat format render, continuous batching, `parse_assistant`)
writes a turn; its tool calls run in the sandbox and come back as tool messages (text and any displayed
images); this repeats until a turn has no tool call (its content is the answer) or `max_turns` turns.

Metrics: `eval/tool_call_rate` (episodes with at least one tool call, malformed ones included),
`eval/code_ok_rate` (tool calls that ran without error, over all calls; 0 when there were none),
`eval/vision_accuracy` (right final answers, `VisionTask.grade`), `eval/episode_errors` (episodes the backend
refused a turn of, e.g. a full context: a number that should be 0), and per kind
(`eval/vision_accuracy/<kind>`, `eval/tool_call_rate/<kind>`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k25.data.chat import ChatFormat
from k25.data.sft.records import image_part
from k25.data.sft.trajectory import PYTHON_TOOL
from k25.data.sft.vision_tasks import VISION_TASKS, VisionTask, eval_tasks
from k25.infer.client import ChatClient, ClientError
from k25.tools.base import Toolset
from k25.tools.python import PythonSandbox, PythonTool


def default_agent_eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        kinds=list(VISION_TASKS),  # counting grounding ocr chart maze pie spot_difference
        per_kind=4,  # held-out tasks per kind (0: no agent eval)
        max_turns=3,  # assistant turns per episode
        max_new_tokens=320,  # per turn
        max_len=1536,  # sampler context (prompt + all turns); an episode that outgrows it ends there
        slots=8,  # concurrent sequences in the sampler
        sandboxes=4,  # concurrent Python sessions
        sandbox_timeout_s=10.0,
    ))


@dataclasses.dataclass
class EpisodeResult:
    kind: str
    tool_calls: int
    ok_calls: int
    score: float
    turns: int
    messages: list[dict[str, Any]]
    error: str | None = None  # the backend refused a turn (e.g. the context is full): the episode ended there


async def run_episode(client: ChatClient, task: VisionTask, *, max_turns: int, max_new_tokens: int,
                      sandbox: PythonSandbox, seed: int = 0) -> EpisodeResult:
    """One agent loop on `task` with `sandbox` (a started session holding the task's images)."""
    toolset = Toolset([PythonTool(sandbox)])
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.user_content()}]
    calls = ok = turns = 0
    answer: str | None = None
    error = None
    for turn in range(max_turns):
        try:
            res = await client.chat(messages, tools=[PYTHON_TOOL], temperature=0.0, max_tokens=max_new_tokens,
                                    seed=seed + turn, chat_template_kwargs={"thinking": False})
        except ClientError as e:  # e.g. the context is full: the episode ends without an answer (counted)
            error = str(e)
            break
        turns += 1
        msg = dict(res.message)
        invalid = msg.pop("invalid_tool_calls", None) or []
        messages.append(msg)
        if not msg.get("tool_calls") and not invalid:
            answer = msg.get("content")
            break
        for k, call in enumerate(list(msg.get("tool_calls") or []) + invalid):
            calls += 1
            if call.get("error"):
                text, images = f"malformed tool call: {call['error']}", []
            else:
                result = await toolset.dispatch(call)
                ok += int(result.ok)
                text, images = result.content(), result.images
            content: Any = text
            if images:
                content = [{"type": "text", "text": text}] + [image_part(im) for im in images[:1]]
            messages.append({"role": "tool", "tool_call_id": call.get("id") or f"invalid:{k}", "content": content})
    return EpisodeResult(task.kind, calls, ok, task.grade(answer) if answer is not None else 0.0, turns, messages,
                         error)


async def run_all(client: ChatClient, tasks: list[VisionTask], cfg: ml_collections.ConfigDict) -> list[EpisodeResult]:
    limit = asyncio.Semaphore(int(cfg.sandboxes))

    async def one(i: int, task: VisionTask) -> EpisodeResult:
        async with limit:
            sandbox = PythonSandbox(timeout_s=float(cfg.sandbox_timeout_s), memory_mb=768, images=task.images)
            try:
                await asyncio.to_thread(sandbox.start)
                return await run_episode(client, task, max_turns=int(cfg.max_turns),
                                         max_new_tokens=int(cfg.max_new_tokens), sandbox=sandbox, seed=i)
            finally:
                await asyncio.to_thread(sandbox.close)

    return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks))))


def summarize(results: list[EpisodeResult]) -> dict[str, float]:
    """The eval/ metrics of a list of episodes (overall and per kind)."""
    def stats(rs: list[EpisodeResult]) -> tuple[float, float, float]:
        calls = sum(r.tool_calls for r in rs)
        return (float(np.mean([r.tool_calls > 0 for r in rs])), sum(r.ok_calls for r in rs) / calls if calls else 0.0,
                float(np.mean([r.score for r in rs])))

    out: dict[str, float] = {}
    out["eval/tool_call_rate"], out["eval/code_ok_rate"], out["eval/vision_accuracy"] = stats(results)
    out["eval/episode_errors"] = float(np.mean([r.error is not None for r in results]))
    by_kind: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in results:
        by_kind[r.kind].append(r)
    for kind, rs in by_kind.items():
        rate, _, acc = stats(rs)
        out[f"eval/tool_call_rate/{kind}"], out[f"eval/vision_accuracy/{kind}"] = rate, acc
    return out


class VisionToolEval:
    """The held-out tasks, fixed at construction; calling it on a model runs every episode and summarises."""

    def __init__(self, cfg: ml_collections.ConfigDict, fmt: ChatFormat, seed: int = 0):
        self.cfg, self.fmt = cfg, fmt
        self.tasks = eval_tasks(list(cfg.kinds), int(cfg.per_kind), seed)
        self.last_results: list[EpisodeResult] = []

    def __call__(self, model: nnx.Module) -> dict[str, float]:
        from k25.infer import Sampler
        from k25.infer.client import SamplerClient

        sampler = Sampler(model, max_slots=int(self.cfg.slots), max_len=int(self.cfg.max_len),
                          cache_dtype=jnp.float32)
        client = SamplerClient(sampler, self.fmt, thinking=False)
        self.last_results = asyncio.run(run_all(client, self.tasks, self.cfg))
        return summarize(self.last_results)
