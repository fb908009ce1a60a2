"""Agent Swarm and PARL at toy scale: the single-agent baseline, the scripted swarm and the PARL-trained
orchestrator on held-out wide-search tasks under critical-step budgets (report §3, Figure 4).

    python -m experiments.run --config=experiments/swarm.py:single --workdir=/tmp/swarm/single
    python -m experiments.run --config=experiments/swarm.py:swarm --workdir=/tmp/swarm/swarm
    python -m experiments.run --config=experiments/swarm.py:warmup --workdir=/tmp/swarm/warmup
    python -m experiments.run --config=experiments/swarm.py:parl --workdir=/tmp/swarm/parl \\
        --config.init_from=/tmp/swarm/warmup
    python -m experiments.swarm plot OUT.png RUN_DIR...     # Figure 4 analog from the runs' metrics.jsonl

ARG:
  single            the single-agent baseline (the orchestrator works serially), no training: one evaluation.
  swarm             the scripted orchestrator (4 companies per subagent, frozen scripted subagents), no training.
  warmup            the `lm` stage on the width policy's warm-up data (k25/data/synthetic/parl_width.py:
                    scripted orchestrator decisions, mostly serial), loss on the answer digit.
  parl              PARL from `init_from`: λ1·r_parallel + λ2·r_finish + r_perf, λ1 and λ2 annealed to 0.
  parl_no_parallel  the same without r_parallel (λ1 = 0): the serial-collapse ablation.
  parl_no_finish    the same without r_finish (λ2 = 0): the spurious-parallelism ablation.
  smoke             a few PARL steps of a smaller model, for tests (no init_from needed).

The contention setting (`config.parl.contention`, k25.swarm.parl.Contention: each subagent of a wave of m
fails with probability 0.2 · max(0, m − 4)), where the task reward alone is best at a moderate width, the
widest swarms lose to it and the narrowest are worse than serial, so the ablations' failure modes can show:
  swarm_contention             the scripted orchestrator under contention, no training.
  warmup_serial                `warmup` with a more serial behaviour mixture (serial 0.8, else k uniform in 1..9).
  parl_contention              PARL under contention from `init_from` (a `warmup_serial` run), parallel_target 12.
  parl_contention_no_parallel  the same without r_parallel (λ1 = 0).
  parl_contention_no_finish    the same without r_finish (λ2 = 0).
  `python -m experiments.swarm landscape [ARG]` prints the held-out task reward per width under ARG's setting.

The whole orchestrator in the chat format (`config.parl.env="chat"`: the model writes Appendix E's
create_subagent / assign_task calls and the answer itself, through k25.swarm.parl.ParlEnv), on deep search:
  warmup_chat       the `sft` stage on the scripted orchestrator's deep-search episodes (source
                    `swarm_orchestrator`, k25/swarm/trajectories.py), a fresh 2-layer 128-wide K2.
  parl_chat         PARL from `init_from` (a `warmup_chat` run) with frozen scripted subagents; held-out
                    deep-search questions under a 24-step budget.
  chat_smoke        one chat PARL step of a fresh tiny model, for tests.

Every run logs `eval/item_f1`, `eval/row_f1`, `eval/critical_steps` (mean per episode) and
`eval/subagents_per_episode` over every held-out task (12) under every budget (16, 24, 40 critical steps).
"""

from __future__ import annotations

import ml_collections

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.model.config import tiny
from k25.swarm.parl_stage import default_config_fields


def _model(c: ml_collections.ConfigDict, hidden: int = 64, layers: int = 2) -> None:
    c.model = model_config_dict(tiny(vocab_size=272, hidden_size=hidden, num_hidden_layers=layers))
    c.data = default_data_config()
    c.data.tokenizer = "byte"
    c.data.sources = {"parl_width": 1.0}


def warmup_config(serial_fraction: float = 0.5) -> ml_collections.ConfigDict:
    c = base_config()
    _model(c)
    c.data.synthetic.parl_width = ml_collections.ConfigDict({"serial_fraction": serial_fraction})
    c.total_steps, c.batch_size, c.seq_len = 200, 32, 32
    c.log_every, c.eval_every, c.checkpoint_every = 50, 0, 200
    c.optim.lr, c.optim.warmup_steps = 3e-3, 20
    c.eval_examples, c.eval_at_start = 0, False
    return c


def parl_config(lambda1: float = 0.3, lambda2: float = 0.3) -> ml_collections.ConfigDict:
    c = base_config()
    _model(c)
    default_config_fields(c)
    c.init_from = ""  # the warm-up run's workdir
    c.rl.group_size = 8
    c.batch_size = 64  # 8 (task, budget) prompts x K=8 widths
    c.seq_len = 32
    c.rl.rollout.max_response_tokens = 4
    c.rl.rollout.max_turn_tokens = 4
    c.rl.rollout.tokens_per_iteration = 4
    c.rl.sampler.max_slots = 64
    c.rl.sampler.min_bucket = 32
    c.rl.sampler.eval_max_new_tokens = 4
    c.parl.reward.lambda1, c.parl.reward.lambda2 = lambda1, lambda2
    c.parl.reward.anneal_steps = 20
    c.parl.reward.parallel_target = 4
    c.total_steps = 30
    c.log_every, c.eval_every, c.checkpoint_every = 2, 10, 10
    c.eval_examples = 12  # held-out tasks (x 3 budgets)
    c.eval_at_start = True
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    return c


def contention_config(lambda1: float = 0.3, lambda2: float = 0.3) -> ml_collections.ConfigDict:
    """`parl_config` with unreliable subagents (see the module docstring). parallel_target 12 (the most
    subagents a width-9 swarm launches with its retries) keeps r_parallel growing past the task reward's best
    width, so without r_finish it can pull toward wide swarms whose subagents fail."""
    c = parl_config(lambda1, lambda2)
    c.parl.contention.rate, c.parl.contention.free = 0.2, 4
    c.parl.reward.parallel_target = 12
    return c


def _chat_model(c: ml_collections.ConfigDict, hidden: int = 128, layers: int = 2) -> None:
    # episodes are ~2.5k byte tokens: attention in 256-row blocks keeps the (s, s) scores out of memory and
    # is the fastest block size measured on the 2-core CPU (2.8 s for batch 4 x 2816, 3.5 s at 512)
    c.model = model_config_dict(tiny(vocab_size=278, hidden_size=hidden, num_hidden_layers=layers,
                                     attention_chunk=256, max_position_embeddings=4096))


def warmup_chat_config() -> ml_collections.ConfigDict:
    """SFT of a fresh orchestrator on the scripted orchestrator's deep-search episodes (chat format)."""
    from k25.train.sft import default_sft_data_config

    c = base_config()
    c.stage = "sft"
    _chat_model(c)
    c.data = default_sft_data_config()
    c.data.sources = {"swarm_orchestrator_compact": 400}
    c.data.eval_conversations = 8
    c.total_steps, c.batch_size, c.seq_len = 500, 2, 2816  # ~10 min; batch 4 x 250 steps left the calls garbled
    c.data.drop_long = True
    c.log_every, c.eval_every, c.checkpoint_every = 25, 250, 250
    c.eval_examples, c.eval_at_start = 1, False
    c.optim.lr, c.optim.warmup_steps = 3e-3, 20
    return c


def chat_config() -> ml_collections.ConfigDict:
    """PARL of the whole chat-format orchestrator on deep search (see the module docstring)."""
    c = parl_config()
    _chat_model(c)
    c.rl.format, c.rl.chat_format = "chat", "byte"
    c.parl.env, c.parl.kinds, c.parl.budgets = "chat", ("deep_search",), (24,)
    c.parl.prompt = "compact"  # as the warm-up's conversations (swarm_orchestrator_compact)
    c.parl.train_tasks = 400  # the deep-search training stream the warm-up's conversations came from
    c.rl.group_size, c.batch_size, c.seq_len = 4, 16, 2816
    c.rl.rollout.max_response_tokens = 1536  # the orchestrator's turns and what comes back to it
    c.rl.rollout.max_turn_tokens = 896  # the longest scripted turn (four assign_task calls) is 734
    c.rl.rollout.tokens_per_iteration = 1536
    c.rl.sampler.max_slots = 16
    c.rl.sampler.min_bucket = 64
    c.rl.sampler.eval_max_new_tokens = 896
    c.rl.sampler.eval_max_response_tokens = 1536
    c.parl.reward.parallel_target = 4
    c.eval_examples = 10  # held-out deep-search questions
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 1, 10, 5
    c.optim.lr = 1e-3
    return c


def baseline_config(policy: str) -> ml_collections.ConfigDict:
    c = parl_config()
    c.parl.policy = policy
    c.total_steps = 0  # evaluation only (at step 0)
    c.async_checkpoints = False
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "parl"
    if arg == "warmup":
        return warmup_config()
    if arg in ("single", "swarm"):
        return baseline_config({"single": "serial", "swarm": "scripted"}[arg])
    if arg == "parl":
        return parl_config()
    if arg == "parl_no_parallel":
        return parl_config(lambda1=0.0)
    if arg == "parl_no_finish":
        return parl_config(lambda2=0.0)
    if arg == "warmup_serial":  # the report's collapse starts from an orchestrator that rarely parallelises
        return warmup_config(serial_fraction=0.8)
    if arg == "swarm_contention":
        c = contention_config()
        c.parl.policy, c.total_steps, c.async_checkpoints = "scripted", 0, False
        return c
    if arg == "parl_contention":
        return contention_config()
    if arg == "parl_contention_no_parallel":
        return contention_config(lambda1=0.0)
    if arg == "parl_contention_no_finish":
        return contention_config(lambda2=0.0)
    if arg == "warmup_chat":
        return warmup_chat_config()
    if arg == "parl_chat":
        return chat_config()
    if arg == "chat_smoke":
        c = chat_config()
        _chat_model(c, hidden=32, layers=1)
        c.parl.train_tasks = 8
        c.rl.group_size, c.batch_size, c.seq_len = 2, 4, 2560
        c.rl.rollout.max_response_tokens = c.rl.rollout.tokens_per_iteration = 48
        c.rl.rollout.max_turn_tokens = 48
        c.rl.sampler.max_slots = 4
        c.rl.sampler.eval_max_new_tokens = c.rl.sampler.eval_max_response_tokens = 48
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 1, 1, 0, 1
        c.eval_examples, c.eval_at_start = 2, False
        c.async_checkpoints = False
        c.progress_bar = False
        return c
    if arg == "smoke":
        c = parl_config()
        _model(c, hidden=32, layers=1)
        c.rl.group_size = 4
        c.batch_size = 8
        c.rl.sampler.max_slots = 8
        c.parl.budgets = (16,)
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 0, 2
        c.eval_examples, c.eval_at_start = 2, False
        c.async_checkpoints = False
        c.progress_bar = False
        return c
    raise ValueError(f"swarm: unknown ARG {arg!r}; use single, swarm, warmup, parl, parl_no_parallel, "
                     "parl_no_finish, smoke, swarm_contention, warmup_serial, parl_contention, "
                     "parl_contention_no_parallel, parl_contention_no_finish, warmup_chat, parl_chat or "
                     "chat_smoke.")


def plot(out: str, run_dirs: list[str]) -> None:
    """Figure 4 analog: held-out item F1, subagents per episode and critical steps against training step
    (greedy, every eval_every steps), and the same on the sampled training episodes (`parl/...`) with the
    reward, one line per run."""
    from k25.train.metrics import plot_runs

    keys = ("eval/item_f1", "eval/subagents_per_episode", "eval/critical_steps", "parl/item_f1", "parl/subagents",
            "reward")
    plot_runs(out, run_dirs, keys, xlabel="training step", figsize=(14, 7))


def landscape(arg: str = "parl") -> list[dict]:
    """What each width earns under ARG's setting with the frozen scripted policies (no model): per width, the
    means over every held-out task and budget of item F1, critical steps, subagents launched and the finished
    fraction of those (over episodes that launched any), and item F1 per budget."""
    import asyncio
    import dataclasses

    import numpy as np

    from k25.swarm.config import SwarmConfig
    from k25.swarm.parl import WIDTHS, Contention, run_width
    from k25.swarm.tasks import SwarmEnv

    p = get_config(arg).parl
    env = SwarmEnv(int(p.world_seed))
    tools, tasks = env.tools(), env.tasks("wide_search", "heldout")
    contention, base = Contention(**p.contention.to_dict()), SwarmConfig.for_benchmark(p.benchmark)

    async def episodes(width: int, budget: int):
        cfg = dataclasses.replace(base, max_critical_steps=budget)
        return await asyncio.gather(*(run_width(t, tools, width, cfg, contention) for t in tasks))

    out = []
    for w in WIDTHS:
        f1, steps, subs, fin, by_budget = [], [], [], [], {}
        for b in p.budgets:
            traces = asyncio.run(episodes(w, int(b)))
            scores = [t.score(tr.answer)["item_f1"] for t, tr in zip(tasks, traces)]
            by_budget[int(b)] = float(np.mean(scores))
            f1 += scores
            steps += [tr.critical_steps for tr in traces]
            subs += [len(tr.subagents) for tr in traces]
            fin += [np.mean([r["status"] == "done" for r in tr.subagents]) for tr in traces if tr.subagents]
        out.append({"width": w, "item_f1": float(np.mean(f1)), "critical_steps": float(np.mean(steps)),
                    "subagents": float(np.mean(subs)), "finished": float(np.mean(fin)) if fin else float("nan"),
                    "item_f1_by_budget": by_budget})
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["landscape"]:
        for row in landscape(*sys.argv[2:3]):
            per = " / ".join(f"{v:.2f}" for v in row["item_f1_by_budget"].values())
            print(f"k={row['width']} item_f1={row['item_f1']:.2f} critical_steps={row['critical_steps']:.1f} "
                  f"subagents={row['subagents']:.1f} finished={row['finished']:.2f} item_f1_by_budget={per}")
    else:
        from k25.train.metrics import plot_cli

        plot_cli("experiments.swarm", plot)
