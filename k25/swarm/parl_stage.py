"""The PARL stage (`config.stage="parl"`): the RL stage (k25.rl.trainer.RLStage, the one training loop) with the
orchestrator's environment, tasks and evaluation swapped in.

The trained policy is the orchestrator's width choice (`ParlWidthEnv`, k25.swarm.parl); its subagents are
frozen scripted policies (k25.swarm.policies) run by the swarm runtime, so only the orchestrator's tokens
are in the trajectories (loss mask 1 on its digit and stop token, nothing else). Tasks are the offline wide-
search tasks of `SwarmEnv(config.parl.world_seed)` under critical-step budgets `config.parl.budgets`:
training draws (train-split task, budget) pairs, evaluation runs every held-out task under every budget
once, greedily. λ1 and λ2 anneal with the trainer step (the iterator's `observe_state` passes it on).

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
from k25.rl.rollout import EnvPool, RolloutManager, SamplerPolicy
from k25.rl.trainer import RLIterator, RLStage, default_rl_config
from k25.swarm.config import SwarmConfig
from k25.swarm.orchestrator import run_swarm
from k25.swarm.parl import (
    Contention,
    ParlRewardConfig,
    ParlWidthEnv,
    contended_clients,
    episode_reward,
    run_width,
    width_rl_task,
)
from k25.swarm.policies import scripted_policy

POLICIES = ("model", "serial", "scripted")
LOGGED = ("reward", "r_parallel", "r_finish", "r_perf", "item_f1", "row_f1", "success", "critical_steps",
          "subagents", "width", "valid", "lambda1", "lambda2")


def default_parl_config() -> ml_collections.ConfigDict:
    """The `config.parl` fields with their defaults (the RL fields live in `config.rl` as for the rl stage)."""
    p = ml_collections.ConfigDict()
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
    """RLStage with ParlWidthEnv episodes on swarm tasks and the swarm metrics as its evaluation."""

    def __init__(self, config: ml_collections.ConfigDict):
        if config.rl.format != "plain":
            raise ValueError("config.rl.format must be 'plain' for the parl stage (the width policy answers one "
                             "digit after its observation; the chat-format ParlEnv is not trained here)")
        super().__init__(config)
        p = config.parl
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

    @property
    def world(self):
        """The task world, built once on first use (building and indexing it takes seconds)."""
        if self._world is None:
            from k25.swarm.tasks import SwarmEnv

            env = SwarmEnv(int(self.config.parl.world_seed))
            train, heldout = env.tasks("wide_search", "train"), env.tasks("wide_search", "heldout")
            self._world = (env.tools(), train, heldout, {t.task_id: t for t in train + heldout})
        return self._world

    # ----------------------------------------------------------------------------------------- pieces
    def make_env(self) -> ParlWidthEnv:
        tools, _, _, by_id = self.world
        return ParlWidthEnv(self.fmt, by_id, tools, swarm_config=self.swarm_cfg, reward=self.reward_cfg,
                            step_fn=lambda: self.current_step, cache=self.episodes, contention=self.contention)

    def task(self, index: int, seed: int) -> Task:
        """The `index`-th training (task, budget) pair of stream `seed`."""
        _, train, _, _ = self.world
        rng = np.random.default_rng([seed, index])
        t = width_rl_task(train[int(rng.integers(len(train)))], self.budgets[int(rng.integers(len(self.budgets)))])
        return dataclasses.replace(t, id=f"{t.id}#{index}")  # ids are unique within a rollout iteration

    def eval_tasks(self) -> list[Task]:
        """Every held-out task under every budget (eval_examples caps the tasks, 0 = none)."""
        _, _, heldout, _ = self.world
        n = int(self.config.eval_examples)
        return [width_rl_task(t, b) for b in self.budgets for t in heldout[:n]]

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
            _, params, buffers = nnx.split(model, nnx.Param, ...)
            self.push_weights(nnx.to_pure_dict(params), nnx.to_pure_dict(buffers))
            n_new = int(self.rl.sampler.eval_max_new_tokens)
            cfg = dataclasses.replace(self.rollout_cfg, group_size=1, temperature=0.0, tokens_per_iteration=n_new,
                                      max_response_tokens=n_new, max_turn_tokens=n_new)
            mgr = RolloutManager(SamplerPolicy(self.sampler), EnvPool(self.make_env, len(tasks)), cfg)
            res = asyncio.run(mgr.run_iteration(tasks, 0))
            by_task = {e.task["id"]: e for e in res.finished + res.carried}
            # a cut-off or failed episode ran no swarm: it scores as an invalid action
            empty = episode_reward([{"main_steps": 1, "sub_steps": [], "subagents": []}], {}, self.current_step,
                                   self.reward_cfg)
            rows = [dict(by_task[t.id].info.get("components", empty), reward=by_task[t.id].reward)
                    if t.id in by_task and by_task[t.id].status == "done" else empty for t in tasks]
        else:
            rows = asyncio.run(self._fixed_all(tasks))
        out: dict[str, Any] = {}
        names = {"subagents": "subagents_per_episode"}
        for suffix, sel in [("", tasks)] + [(f"_b{b}", [t for t in tasks if t.target["budget"] == b])
                                            for b in self.budgets]:
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
