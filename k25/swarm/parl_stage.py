"""The PARL stage (`config.stage="parl"`): the RL stage (k25.rl.trainer.RLStage, the one training loop) with the
orchestrator's environment, tasks and evaluation swapped in.

The trained policy is the orchestrator's width choice (`ParlWidthEnv`, k25.swarm.parl); its subagents are
frozen scripted policies (k25.swarm.policies) run by the swarm runtime, so only the orchestrator's tokens
are in the trajectories (loss mask 1 on its digit and stop token, nothing else). Tasks are the offline wide-
search tasks of `SwarmEnv(config.parl.world_seed)` under critical-step budgets `config.parl.budgets`:
training draws (train-split task, budget) pairs, evaluation runs every held-out task under every budget
once, greedily. λ1 and λ2 anneal with the trainer step (the iterator's `observe_state` passes it on).

With `config.parl.env="chat"` the trained policy is the whole orchestrator instead (`ParlEnv`): it writes
Appendix E's `create_subagent` / `assign_task` calls and the answer in the chat format, on tasks of
`config.parl.kinds`; the subagents are frozen (`config.parl.subagent`: scripted, an OpenAI-compatible
endpoint or a k25 checkpoint) and their tokens never enter the trajectory (their final messages come back
as tool results, loss mask 0). The warm-up for it is the sft stage on the scripted orchestrator's episodes
(k25/swarm/trajectories.py).

Subagents and the scripted orchestrator are deterministic, so an episode's trace depends only on (task,
budget, width): the stage's environments share a memo of them (`self.episodes`), which makes a step cost
the model's sampling and update once the pairs it visits have been run (checked against fresh runs in tests).

`config.parl.policy` picks who decides the width at evaluation: "model" (the trained orchestrator), or a
fixed baseline with no training ("serial": the single-agent baseline; "scripted": the scripted orchestrator,
4 companies per subagent), so the baselines run on exactly the same tasks, budgets and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from k25.rl.env import Task
from k25.rl.trainer import RLIterator, RLStage, default_rl_config
from k25.swarm.config import SwarmConfig
from k25.swarm.orchestrator import run_swarm
from k25.swarm.parl import (
    Contention,
    ParlEnv,
    ParlRewardConfig,
    ParlWidthEnv,
    contended_clients,
    episode_reward,
    run_width,
    swarm_rl_task,
    width_rl_task,
)
from k25.swarm.policies import scripted_policy

POLICIES = ("model", "serial", "scripted")
LOGGED = ("reward", "r_parallel", "r_finish", "r_perf", "item_f1", "row_f1", "success", "critical_steps",
          "subagents", "width", "valid", "lambda1", "lambda2")


def default_parl_config() -> ml_collections.ConfigDict:
    """The `config.parl` fields with their defaults (the RL fields live in `config.rl` as for the rl stage)."""
    p = ml_collections.ConfigDict()
    # what the model decides: "width" (one digit after a compact observation; the rest is scripted) or "chat"
    # (the whole orchestrator: Appendix E's create_subagent / assign_task calls and the answer, in the chat
    # format, through ParlEnv; needs config.rl.format="chat")
    p.env = "width"
    p.kinds = ("wide_search",)  # task kinds drawn for training and evaluation (the width env: wide_search only)
    # training tasks per kind; 0 = the kind's own count (12 wide-search sectors, 10 deep-search questions,
    # 10 ledger questions). Deep search draws as many questions as asked; the other kinds have no more.
    p.train_tasks = 0
    # the frozen subagents of the chat env: "scripted" (k25.swarm.policies), "openai/NAME" (an OpenAI-compatible
    # endpoint: JUDGE_BASE_URL / OPENAI_BASE_URL) or "k25/PATH" (a k25 run or HF checkpoint, sampled in process)
    p.subagent = "scripted"
    # the chat orchestrator's system prompt and tools (k25.swarm.prompts.ORCHESTRATOR_PROMPTS): "appendix_e"
    # (Appendix E's prompt, the search tools and the swarm tools) or "compact" (a short prompt, swarm tools only)
    p.prompt = "appendix_e"
    p.policy = "model"  # who picks the width at evaluation: model | serial | scripted
    p.world_seed = 0  # SwarmEnv seed: the generated world and its train / held-out sectors
    p.budgets = (16, 24, 40)  # critical-step budgets tasks are drawn under
    p.benchmark = "widesearch"  # Appendix E step limits (orchestrator / subagent)
    p.reward = ml_collections.ConfigDict(dataclasses.asdict(ParlRewardConfig()))
    # unreliable subagents (k25.swarm.parl.Contention; rate 0 = off): the setting for the ablations
    p.contention = ml_collections.ConfigDict(dataclasses.asdict(Contention()))
    return p


def default_config_fields(c: ml_collections.ConfigDict) -> None:
    """Set `c.stage`, `c.rl` (plain turns on the width prompts) and `c.parl` to the stage's defaults."""
    c.stage = "parl"
    c.rl = default_rl_config()
    c.rl.tasks = {"parl_width": 1.0}
    c.rl.format = "plain"
    c.parl = default_parl_config()


class ParlStage(RLStage):
    """RLStage with PARL episodes on swarm tasks (`ParlWidthEnv`, or `ParlEnv` with `config.parl.env="chat"`) and
    the swarm metrics as its evaluation."""

    def __init__(self, config: ml_collections.ConfigDict):
        p = config.parl
        env = p.get("env", "width")
        if env not in ("width", "chat"):
            raise ValueError(f"config.parl.env={env!r}: 'width' (the width policy) or 'chat' (the whole "
                             "orchestrator in the chat format)")
        self.chat = env == "chat"
        want = "chat" if self.chat else "plain"
        if config.rl.format != want:
            raise ValueError(f"config.rl.format={config.rl.format!r}: the parl stage with config.parl.env="
                             f"{env!r} needs config.rl.format={want!r} (the width policy answers "
                             "one digit after its observation; the chat orchestrator writes tool calls)")
        self.kinds = tuple(p.get("kinds", ("wide_search",)))
        from k25.swarm.tasks import TASK_KINDS

        if not self.kinds or any(k not in TASK_KINDS for k in self.kinds):
            raise ValueError(f"config.parl.kinds={p.get('kinds')}: a non-empty list of {TASK_KINDS}")
        if not self.chat:
            if self.kinds != ("wide_search",):
                raise ValueError(f"config.parl.kinds={self.kinds}: the width env runs wide_search only; set "
                                 "config.parl.env='chat' for other kinds")
            if p.get("subagent", "scripted") != "scripted":
                raise ValueError(f"config.parl.subagent={p.subagent!r}: the width env runs scripted subagents (its "
                                 "episode memo assumes them); set config.parl.env='chat' for other subagents")
        elif p.policy != "model" or float(p.contention.rate) > 0:
            raise ValueError("config.parl.policy and config.parl.contention belong to the width env; with "
                             "config.parl.env='chat' keep policy='model' and contention.rate=0 (run the fixed "
                             "baselines with `python -m experiments.swarm_run`)")
        from k25.swarm.prompts import ORCHESTRATOR_PROMPTS

        prompt = p.get("prompt", "appendix_e")
        if prompt not in ORCHESTRATOR_PROMPTS:
            raise ValueError(f"config.parl.prompt={prompt!r}: one of {sorted(ORCHESTRATOR_PROMPTS)}")
        self.system_prompt, self.orchestrator_env_tools = ORCHESTRATOR_PROMPTS[prompt]
        super().__init__(config)
        if p.policy not in POLICIES:
            raise ValueError(f"config.parl.policy={p.policy!r}: one of {POLICIES}")
        self.budgets = tuple(int(b) for b in p.budgets)
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"config.parl.budgets={p.budgets}: a non-empty list of positive critical-step budgets")
        self.reward_cfg = ParlRewardConfig(**p.reward.to_dict())
        self.contention = Contention(**p.contention.to_dict()) if "contention" in p else Contention()
        self.swarm_cfg = SwarmConfig.for_benchmark(p.benchmark)
        self.current_step = 0  # the trainer step of the weights in the sampler (λ annealing)
        self.episodes: dict = {}  # (task, budget, width) -> (stages, scores): the frozen policies are deterministic
        self._world = None
        self._subagent = None

    @property
    def world(self):
        """The task world, built once on first use (building and indexing it takes seconds): its tools, the
        train and held-out tasks of every kind in `config.parl.kinds`, and all of them by id."""
        if self._world is None:
            from k25.swarm.tasks import SwarmEnv

            env = SwarmEnv(int(self.config.parl.world_seed))
            n = int(self.config.parl.get("train_tasks", 0)) or None
            try:
                train = [t for k in self.kinds for t in env.tasks(k, "train", n)]
            except ValueError as e:
                raise ValueError(f"config.parl.train_tasks={n}: {e}") from None
            heldout = [t for k in self.kinds for t in env.tasks(k, "heldout")]
            self._world = (env.tools(), train, heldout, {t.task_id: t for t in train + heldout})
        return self._world

    @property
    def subagent(self):
        """The chat env's frozen subagent client (`config.parl.subagent`), built once."""
        if self._subagent is None:
            spec = str(self.config.parl.subagent)
            if spec == "scripted":
                from k25.infer.client import ScriptedClient

                self._subagent = ScriptedClient(scripted_policy())
            else:
                from k25.rl.rewards import judge_client

                try:
                    self._subagent = judge_client(spec)
                except ValueError:
                    raise ValueError(f"config.parl.subagent={spec!r}: use 'scripted', 'openai/NAME' or "
                                     "'k25/PATH'") from None
        return self._subagent

    # ----------------------------------------------------------------------------------------- pieces
    def make_env(self) -> ParlWidthEnv | ParlEnv:
        tools, _, _, by_id = self.world
        if self.chat:
            return ParlEnv(self.fmt, tools, self.subagent, swarm_config=self.swarm_cfg, reward=self.reward_cfg,
                           step_fn=lambda: self.current_step, orchestrator_env_tools=self.orchestrator_env_tools)
        return ParlWidthEnv(self.fmt, by_id, tools, swarm_config=self.swarm_cfg, reward=self.reward_cfg,
                            step_fn=lambda: self.current_step, cache=self.episodes, contention=self.contention)

    def _rl_task(self, task, budget: int) -> Task:
        return swarm_rl_task(task, self.system_prompt, budget) if self.chat else width_rl_task(task, budget)

    def task(self, index: int, seed: int) -> Task:
        """The `index`-th training (task, budget) pair of stream `seed`."""
        _, train, _, _ = self.world
        rng = np.random.default_rng([seed, index])
        t = self._rl_task(train[int(rng.integers(len(train)))], self.budgets[int(rng.integers(len(self.budgets)))])
        return dataclasses.replace(t, id=f"{t.id}#{index}")  # ids are unique within a rollout iteration

    def eval_tasks(self) -> list[Task]:
        """Every held-out task under every budget (eval_examples caps the tasks of each kind, 0 = none)."""
        _, _, heldout, _ = self.world
        n = int(self.config.eval_examples)
        mine = [t for k in self.kinds for t in [t for t in heldout if t.kind == k][:n]]
        return [self._rl_task(t, b) for b in self.budgets for t in mine]

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        if process_count != 1:
            raise ValueError("the parl stage samples in its own process; run it single-process")
        return ParlIterator(self, seed)

    # ------------------------------------------------------------------------------------- evaluation
    async def _fixed(self, task: Task) -> dict[str, float]:
        """One held-out episode of a fixed baseline policy (config.parl.policy serial | scripted)."""
        tools, _, _, by_id = self.world
        st, budget = by_id[task.target["task_id"]], int(task.target["budget"])
        cfg = dataclasses.replace(self.swarm_cfg, max_critical_steps=budget)
        if self.config.parl.policy == "serial":
            trace, width = await run_width(st, tools, 0, cfg), 0
        else:
            orchestrator, subagent = contended_clients(scripted_policy(), self.contention,
                                                       f"{st.task_id}/{budget}/scripted")
            trace = await run_swarm(st.prompt, orchestrator=orchestrator, subagent=subagent, tools=tools, config=cfg)
            width = len(trace.subagents)
        return episode_reward(trace.stages, st.score(trace.answer), self.current_step, self.reward_cfg, width)

    async def _fixed_all(self, tasks: list[Task]) -> list[dict[str, float]]:
        return list(await asyncio.gather(*(self._fixed(t) for t in tasks)))

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        """Held-out swarm metrics: `eval/item_f1`, `eval/row_f1`, `eval/critical_steps` and
        `eval/subagents_per_episode` (means per episode over every held-out task and budget), the same per
        budget (`..._b{B}`), the chosen width and the reward's terms. The model decides greedily."""
        tasks = self.eval_tasks()
        if not tasks:
            return {}
        if self.config.parl.policy == "model":
            res = self.run_greedy(model, tasks)
            by_task = {e.task["id"]: e for e in res.finished + res.carried}
            # a failed episode, or a cut-off one whose env logs no terms, scores as an invalid action
            empty = episode_reward([{"main_steps": 1, "sub_steps": [], "subagents": []}], {}, self.current_step,
                                   self.reward_cfg)
            rows = [dict(by_task[t.id].info.get("components", empty), reward=by_task[t.id].reward)
                    if t.id in by_task and by_task[t.id].status == "done" else empty for t in tasks]
        else:
            rows = asyncio.run(self._fixed_all(tasks))
        out: dict[str, Any] = {}
        names = {"subagents": "subagents_per_episode"}
        groups = [("", tasks)] + [(f"_b{b}", [t for t in tasks if t.target["budget"] == b]) for b in self.budgets]
        if len(self.kinds) > 1:  # the chat env over several kinds: each kind's figures too
            groups += [(f"_{k}", [t for t in tasks if t.target.get("kind") == k]) for k in self.kinds]
        for suffix, sel in groups:
            ids = {t.id for t in sel}
            rs = [r for t, r in zip(tasks, rows) if t.id in ids]
            keys = LOGGED if not suffix else ("item_f1", "critical_steps", "subagents", "width")
            for k in keys:
                out[f"eval/{names.get(k, k)}{suffix}"] = float(np.mean([r[k] for r in rs]))
        return out


class ParlIterator(RLIterator):
    """RLIterator that tells the stage the trainer step (for λ annealing) and logs the episodes' PARL terms
    (`parl/...` means over the batch's episodes: the Figure 4 curves during training)."""

    def observe_state(self, state: Any, step: int) -> None:
        super().observe_state(state, step)
        self.stage.current_step = int(step)

    def _batch(self, groups):
        for g in groups:
            for e in g:
                comp = e.info.get("components") or {}
                for k in LOGGED[1:]:
                    if k in comp:
                        self._add(f"parl/{k}", [comp[k]])
        return super()._batch(groups)
