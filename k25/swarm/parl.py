"""PARL (report §3): the orchestrator's reward and its token-level environment for the RL trainer.

    r_PARL(x, y) = λ1 · r_parallel + λ2 · r_finish + r_perf,   λ1, λ2 annealed to 0 over training.

The report names the terms but gives no formulas; ours (fields of `ParlRewardConfig`):
- r_parallel, the instantiation reward against serial collapse: min(1, subagents launched / parallel_target);
- r_finish, the sub-agent finish rate against spurious parallelism: subtasks finished / subtasks launched
  (0 when none was launched), where finished means the subagent answered (not an error, timeout or step
  limit, and not an empty answer);
- r_perf, the task-level outcome: the task's score (item F1 for wide search, exact match otherwise).
λ1 and λ2 fall linearly (optax.linear_schedule) from their initial values to 0 at `anneal_steps`.

`ParlEnv` is `k25.rl.env.AgentEnv` with the swarm tools: the orchestrator's turns are token ids (what the
trainer learns from); `assign_task` runs frozen subagents through a `ChatClient`, so their tokens never enter
the orchestrator's trajectory (only their final messages do, as tool results with loss mask 0). Budgets are
in critical steps: the episode ends once `SwarmConfig.max_critical_steps` is spent, and subagents get what
is left of it.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax

from k25.data.synthetic.parl_width import MAX_WIDTH, width_prompt
from k25.infer.client import ChatClient
from k25.rl.env import AgentEnv, Task, TurnFormat
from k25.rl.rewards import RewardResult
from k25.swarm.config import SwarmConfig
from k25.swarm.critical import critical_steps
from k25.swarm.orchestrator import SwarmSession
from k25.swarm.prompts import ORCHESTRATOR_SYSTEM_PROMPT
from k25.swarm.tasks import SwarmTask
from k25.tools.base import Tool, Toolset


@dataclasses.dataclass(frozen=True)
class ParlRewardConfig:
    lambda1: float = 0.2  # initial weight of r_parallel
    lambda2: float = 0.2  # initial weight of r_finish
    anneal_steps: int = 100  # training steps over which λ1, λ2 fall linearly to 0
    parallel_target: int = 4  # subagents launched at which r_parallel saturates

    def __post_init__(self):
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ValueError(f"ParlRewardConfig.lambda1/lambda2 must be >= 0, got {self.lambda1}, {self.lambda2}")
        if self.anneal_steps < 1 or self.parallel_target < 1:
            raise ValueError("ParlRewardConfig.anneal_steps and parallel_target must be >= 1")

    def lambdas(self, step: int) -> tuple[float, float]:
        """(λ1, λ2) at training step `step`: linear from the initial values to 0 at `anneal_steps`."""
        frac = float(optax.linear_schedule(1.0, 0.0, self.anneal_steps)(step))
        return self.lambda1 * frac, self.lambda2 * frac


def parl_reward(stages: Sequence[Mapping], perf: float, step: int, config: ParlRewardConfig) -> dict[str, float]:
    """The PARL reward of one episode from its trace stages (see the module docstring) and task score."""
    runs = [r for s in stages for r in s.get("subagents", ())]
    launched = len(runs)
    finished = sum(r.get("status") == "done" for r in runs)
    r_parallel = min(1.0, launched / config.parallel_target)
    r_finish = finished / launched if launched else 0.0
    l1, l2 = config.lambdas(step)
    return {"reward": l1 * r_parallel + l2 * r_finish + float(perf), "r_parallel": r_parallel,
            "r_finish": r_finish, "r_perf": float(perf), "lambda1": l1, "lambda2": l2,
            "critical_steps": float(critical_steps(stages)), "subagents": float(launched)}


def swarm_rl_task(task: SwarmTask, system_prompt: str = ORCHESTRATOR_SYSTEM_PROMPT,
                  budget: int | None = None) -> Task:
    """An offline swarm task as an RL task (JSON-able, so partial rollouts can carry it). `budget`: the
    episode's critical-step budget (None: the environment's `SwarmConfig.max_critical_steps`)."""
    target: dict[str, Any] = {"kind": task.kind, "gold": task.gold}
    if budget is not None:
        target["budget"] = int(budget)
    return Task(id=task.task_id if budget is None else f"{task.task_id}@b{budget}",
                messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": task.prompt}],
                target=target, meta={"split": task.split, **task.info})


def _scores(task: Task, answer: str) -> dict[str, float]:
    """The task's scores of `answer` (`SwarmTask.score`); an empty answer scores nothing."""
    if not answer.strip():
        return {}
    return SwarmTask(task.id, task.target["kind"], task.meta.get("split", ""), "", task.target["gold"]).score(answer)


class ParlEnv(AgentEnv):
    """The orchestrator's environment: the task's tools plus `create_subagent` / `assign_task` bound to a
    fresh `SwarmSession` per episode; the final reward is `parl_reward` at the trainer step `step_fn()`.
    `info` of every step carries `critical_steps` (so far); the last one adds the reward's terms."""

    def __init__(self, fmt: TurnFormat, tools: Sequence[Tool], subagent: ChatClient, *,
                 swarm_config: SwarmConfig | None = None, reward: ParlRewardConfig | None = None,
                 step_fn: Callable[[], int] = lambda: 0, tool_timeout_s: float | None = None,
                 max_tool_chars: int = 8000, orchestrator_env_tools: bool = True) -> None:
        """`tools`: the environment's; subagents always get them, the orchestrator too unless
        `orchestrator_env_tools` is False (then it has only create_subagent and assign_task)."""
        self.orchestrator_env_tools = orchestrator_env_tools
        self.swarm_config = swarm_config or SwarmConfig()
        self.reward_config = reward or ParlRewardConfig()
        self.env_tools, self.subagent, self.step_fn = list(tools), subagent, step_fn
        cfg = self.swarm_config
        super().__init__(fmt, self._judge, None, max_turns=cfg.main_max_steps,
                         tool_timeout_s=tool_timeout_s or cfg.sub_timeout_s + 5, max_tool_chars=max_tool_chars)
        self.stages: list[dict] = []
        self.episode_config = self.swarm_config  # with the task's own budget, if it names one
        self.session: SwarmSession | None = None
        self.last_reward: dict[str, float] = {}

    def reset(self, task: Task) -> list[int]:
        budget = (task.target or {}).get("budget") if isinstance(task.target, Mapping) else None
        self.episode_config = self.swarm_config if budget is None else dataclasses.replace(
            self.swarm_config, max_critical_steps=int(budget))
        self.session = SwarmSession(self.subagent, self.env_tools, self.episode_config)
        self.session.spent = lambda: critical_steps(self.stages) + 1
        self.toolset = Toolset([*(self.env_tools if self.orchestrator_env_tools else ()), *self.session.tools()])
        self.stages, self.last_reward = [], {}
        return super().reset(task)

    async def step(self, action: Sequence[int]) -> tuple[list[int], float, bool, dict[str, Any]]:
        n_before = len(self.messages)
        obs, reward, done, info = await super().step(action)
        if not done:
            self.stages.append(self.session.stage(self.messages[n_before].get("tool_calls") or []))
            budget = self.episode_config.max_critical_steps
            if budget is not None and critical_steps(self.stages) >= budget:  # spent: no answer, so r_perf = 0
                self.done, done, obs = True, True, []
                reward = self._finish(self.task, "").reward
                info["budget_exhausted"] = True
        info["critical_steps"] = critical_steps(self.stages)
        if done:
            info.update(self.last_reward)
            info["components"] = {k: v for k, v in self.last_reward.items() if k != "reward"}
        return obs, reward, done, info

    def cut_off(self) -> dict[str, float]:
        """The terms of an episode the rollout cut off (no answer: r_perf 0, `valid` 0), so that its subagents,
        width and critical steps still enter the logged means; the rollout gives it reward 0."""
        super().cut_off()
        return dict(self._finish(self.task, "").components)

    async def _judge(self, task: Task, response: Mapping, messages: Sequence[Mapping]) -> RewardResult:
        """AgentEnv's final turn (an answer, a cut-off turn, or the turn limit): one more orchestrator step."""
        calls = [(c.get("function") or {}).get("name") for c in response.get("tool_calls") or ()]
        self.stages.append({"main_steps": 1, "sub_steps": [], "tool_calls": calls, "subagents": []})
        return self._finish(task, response.get("content") or "")

    def _finish(self, task: Task, answer: str) -> RewardResult:
        """The episode's reward and the terms the rollouts log: `width` is its widest wave (0: no subagent
        ran), `valid` whether it ended in an answer."""
        width = max((len(s.get("sub_steps", ())) for s in self.stages), default=0)
        r = episode_reward(self.stages, _scores(task, answer), self.step_fn(), self.reward_config, width)
        r["valid"] = float(bool(answer.strip()))
        self.last_reward = r
        return RewardResult(r["reward"], {k: v for k, v in r.items() if k != "reward"})


# ------------------------------------------------------------------------------------------------------------
# The width action: a restricted orchestrator for toy-scale PARL on CPU.
#
# A tiny byte-level model cannot learn Appendix E's tool-call JSON, the merge and the bookkeeping in the minutes
# a CPU run has; what PARL is about is the decision the orchestrator makes: whether to parallelise and how
# wide. `ParlWidthEnv` keeps that decision with the model and scripts the rest: the model reads a compact
# observation (entities in the registry listing, the critical-step budget) and answers one digit, its width
# k; k = 0 runs the task serially (the orchestrator works alone, as the single-agent baseline), k >= 1 runs
# the scripted orchestrator (registry read, create_subagent, one assign_task wave with ceil(n / k) companies
# per subagent, one retry of failures, merge) around frozen scripted subagents, under the budget. The
# trace, critical steps and `parl_reward` are the runtime's own; the model's tokens are the whole trajectory
# (subagent tokens never enter it).
# ------------------------------------------------------------------------------------------------------------

WIDTHS = tuple(range(MAX_WIDTH + 1))  # the action vocabulary: one digit


def parse_width(text: str) -> int | None:
    """The digit the policy answered, or None when it is not exactly one digit."""
    text = text.strip()
    return int(text) if len(text) == 1 and text.isdigit() else None


@dataclasses.dataclass(frozen=True)
class Contention:
    """Unreliable frozen subagents: each subagent of a wave of m launches loses its final answer (its backend
    raises, which the runtime reports to the orchestrator as a failed task) with probability
    p(m) = min(1, rate · max(0, m − free)). Shared resources (rate limits, tool backends) degrade with the
    number of concurrent callers, so the widest swarm is no longer the best one for the task reward alone,
    which is where the ablations' failure modes can show. `rate = 0` (the default) is off. The draws are
    seeded by (seed, task, budget, width, wave, call), so an episode is reproducible and memoisable."""

    rate: float = 0.0  # failure probability added per subagent launched beyond `free` in one wave
    free: int = 3  # subagents a wave can launch without contention
    seed: int = 0  # the episodes' seed

    def __post_init__(self):
        if self.rate < 0 or self.free < 0:
            raise ValueError(f"Contention.rate and free must be >= 0, got {self.rate}, {self.free}")

    def p_fail(self, launched: int) -> float:
        """Failure probability of each subagent of a wave that launched `launched`."""
        return min(1.0, self.rate * max(0, launched - self.free))

    def fails(self, key: str, wave: int, index: int, launched: int) -> bool:
        """Whether call `index` of wave `wave` (of `launched` calls) in episode `key` fails."""
        u = random.Random(zlib.crc32(f"{self.seed}/{key}/{wave}/{index}".encode())).random()
        return u < self.p_fail(launched)


def contended_clients(policy: Callable, contention: Contention | None, key: str):
    """(orchestrator, subagent) clients around one scripted policy for an episode named `key`: the
    orchestrator's `assign_task` turns open waves; a subagent run that `contention` fails raises on its final
    answer, after doing its reads, so its steps still count and the runtime reports the failure. Without
    contention (None or rate 0) both are one plain client."""
    from k25.infer.client import ScriptedClient
    from k25.swarm.policies import tool_history

    if contention is None or contention.rate <= 0:
        client = ScriptedClient(policy)
        return client, client
    wave: dict[str, Any] = {"index": -1, "prompts": []}

    def orchestrator(messages, tools):
        out = policy(messages, tools)
        calls = [] if isinstance(out, str) else tool_history([{"role": "assistant", **out}])
        prompts = [a.get("prompt", "") for name, a, _ in calls if name == "assign_task"]
        if prompts:
            wave.update(index=wave["index"] + 1, prompts=prompts)
        return out

    def subagent(messages, tools):
        out = policy(messages, tools)
        prompts = wave["prompts"]
        if (isinstance(out, str) or not out.get("tool_calls")) and messages[1]["content"] in prompts:
            i = prompts.index(messages[1]["content"])
            if contention.fails(key, wave["index"], i, len(prompts)):
                raise RuntimeError(f"contention: {len(prompts)} subagents in this wave, the answer was lost")
        return out

    return ScriptedClient(orchestrator), ScriptedClient(subagent)


async def run_width(task: SwarmTask, tools: Sequence[Tool], width: int, config: SwarmConfig,
                    contention: Contention | None = None):
    """One episode of `task` with the orchestrator's width choice (see above); returns the runtime's trace.
    With `contention` (rate > 0), the subagents are unreliable as `Contention` describes."""
    from k25.infer.client import ScriptedClient
    from k25.swarm.orchestrator import run_single, run_swarm
    from k25.swarm.policies import scripted_policy

    if width not in WIDTHS:
        raise ValueError(f"width={width} is not an action; choose one of {WIDTHS}")
    n = int(task.info.get("entities", 1))
    if width == 0:  # serial: the scripted agent answers with what it has when the budget runs out
        client = ScriptedClient(scripted_policy(worker_budget=config.max_critical_steps))
        return await run_single(task.prompt, agent=client, tools=tools, config=config)
    orchestrator, subagent = contended_clients(scripted_policy(per_agent=-(-n // width)), contention,
                                               f"{task.task_id}/{config.max_critical_steps}/{width}")
    return await run_swarm(task.prompt, orchestrator=orchestrator, subagent=subagent, tools=tools, config=config)


def width_rl_task(task: SwarmTask, budget: int) -> Task:
    """A wide-search task under a critical-step budget as the width policy's RL task."""
    return Task(id=f"{task.task_id}@b{budget}",
                messages=[{"role": "user", "content": width_prompt(int(task.info["entities"]), budget)}],
                target={"task_id": task.task_id, "budget": budget}, meta={"split": task.split})


def episode_reward(stages: Sequence[Mapping], scores: Mapping[str, float], step: int, config: ParlRewardConfig,
                   width: int | None = None) -> dict[str, float]:
    """`parl_reward` of an episode with its task scores (r_perf: item F1, else success) and the width chosen
    (-1: no valid action) alongside, as the rollouts and evaluations log them (item and row F1 of an answer
    that is not a table: its success)."""
    r = parl_reward(stages, scores.get("item_f1", scores.get("success", 0.0)), step, config)
    # an answer that is not a table is one item: its F1 is its success
    r.update(item_f1=scores.get("item_f1", scores.get("success", 0.0)),
             row_f1=scores.get("row_f1", scores.get("success", 0.0)),
             success=scores.get("success", 0.0), width=-1.0 if width is None else float(width),
             valid=float(width is not None))
    return r


class ParlWidthEnv(AgentEnv):
    """Single-turn PARL environment for the width policy: the action is the model's digit; the episode runs
    in the swarm runtime with a critical-step budget and the reward is `parl_reward` at `step_fn()`.
    A malformed action (not one digit) runs no episode and earns 0. `info["components"]` carries the
    reward's terms and the episode's item_f1 / row_f1 / critical_steps / subagents (kept by the rollouts)."""

    def __init__(self, fmt: TurnFormat, tasks: Mapping[str, SwarmTask], tools: Sequence[Tool], *,
                 swarm_config: SwarmConfig | None = None, reward: ParlRewardConfig | None = None,
                 step_fn: Callable[[], int] = lambda: 0, cache: dict | None = None,
                 contention: Contention | None = None) -> None:
        super().__init__(fmt, self._no_judge, None, max_turns=1)
        self.swarm_tasks, self.env_tools = dict(tasks), list(tools)
        # the frozen scripted subagents and orchestrator are deterministic, so an episode's stages and scores
        # depend only on (task, budget, width) (contention draws are seeded by them too): envs with the same
        # contention may share a memo of them (None: run every episode)
        self.cache, self.contention = cache, contention
        self.swarm_config = swarm_config or SwarmConfig()
        self.reward_config, self.step_fn = reward or ParlRewardConfig(), step_fn

    @staticmethod
    async def _no_judge(task, response, messages) -> RewardResult:
        raise RuntimeError("ParlWidthEnv scores episodes in step()")

    async def step(self, action: Sequence[int]) -> tuple[list[int], float, bool, dict[str, Any]]:
        if self.done or self.task is None:
            raise RuntimeError("step() on a finished episode; call reset(task) first")
        msg = self.fmt.parse(action)
        self.messages.append(msg)
        self.turns, self.done = self.turns + 1, True
        truncated = not action or int(action[-1]) not in self.fmt.stop_ids
        width = None if truncated else parse_width(msg.get("content") or "")
        task = self.swarm_tasks[self.task.target["task_id"]]
        budget = int(self.task.target["budget"])
        if width is None:
            stages, scores = [{"main_steps": 1, "sub_steps": [], "subagents": []}], {}
        else:
            key = (task.task_id, budget, width)
            if self.cache is not None and key in self.cache:
                stages, scores = self.cache[key]
            else:
                cfg = dataclasses.replace(self.swarm_config, max_critical_steps=budget)
                trace = await run_width(task, self.env_tools, width, cfg, self.contention)
                stages, scores = trace.stages, task.score(trace.answer)
                if self.cache is not None:
                    self.cache[key] = (stages, scores)
        r = episode_reward(stages, scores, self.step_fn(), self.reward_config, width)
        comp = {k: v for k, v in r.items() if k != "reward"}
        info = {"turn": self.turns, "tool_calls": 0, "tool_errors": 0, "truncated": truncated,
                "components": comp, "gated": False, "judge_failed": False}
        return [], float(r["reward"]), True, info
