"""Safety as an RL domain: refuse harmful-category requests, answer their benign look-alikes.

    python -m experiments.run --config=experiments/rl_safety.py:warmup --workdir=/tmp/rl_safety/warmup
    python -m experiments.run --config=experiments/rl_safety.py --workdir=/tmp/rl_safety/rl \\
        --config.init_from=/tmp/rl_safety/warmup
    python -m experiments.rl_safety plot /tmp/rl_safety/curves.png /tmp/rl_safety/rl

The task is k25.data.synthetic.safety: templated harmful requests (CBRNE, cyber offence, disinformation,
copyright) and benign look-alikes for training; the held-out figures are measured on the safety suite's own
shipped probes (`cbrne`, `cyber`, `harmful_compliance` to refuse, `over_refusal` to answer), which no train
prompt repeats. The reward is the suite's refusal rule (`refusal_match`) or, with ARG `judge`, the GRM judge
grading against the task's reference with `k25.data.synthetic.safety.REWARD_RUBRIC`.

ARG:
  warmup        the `lm` stage on the task with answers drawn independently of the prompt (half refusals, half
                compliant openings): a policy that knows both behaviours and prefers neither.
  "" (default)  RL from `init_from`: K=8, Eq. 1, rule reward; `eval/refusal_rate` (held-out harmful probes) and
                `eval/over_refusal` (held-out look-alikes) at step 0 and every `eval_every` steps.
  judge         the same with the GRM as the reward: give the judge model, e.g.
                `--config.rl.judge=openai/NAME` with JUDGE_BASE_URL (any OpenAI-compatible server) or
                `--config.rl.judge=k25/PATH`.
  smoke_warmup | smoke
                a few steps of a smaller model, for tests.
"""

from __future__ import annotations

import ml_collections

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.data.synthetic.safety import REWARD_RUBRIC
from k25.model.config import tiny
from k25.rl.trainer import default_rl_config

SEQ_LEN = 208  # the longest held-out probe (139 bytes) + bos + a 64-byte reply + eos, rounded up
REPLY_TOKENS = 64


def _model(c: ml_collections.ConfigDict, hidden: int = 128, layers: int = 4) -> None:
    c.model = model_config_dict(tiny(vocab_size=272, hidden_size=hidden, num_hidden_layers=layers))
    c.data = default_data_config()
    c.data.tokenizer = "byte"
    c.data.sources = {"safety": 1.0}
    c.data.synthetic = ml_collections.ConfigDict({"safety": {"refuse_fraction": 0.5, "harmful_fraction": 0.5}})


def warmup_config(smoke: bool = False) -> ml_collections.ConfigDict:
    c = base_config()
    _model(c, *((64, 2) if smoke else ()))
    c.total_steps, c.batch_size, c.seq_len = 150, 16, SEQ_LEN
    c.log_every, c.eval_every, c.checkpoint_every = 25, 0, 150
    c.optim.lr, c.optim.warmup_steps = 3e-3, 20
    c.eval_examples, c.eval_at_start = 0, False  # the answers are random by design: nothing to score yet
    if smoke:
        c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 4, 4, 2, 4
        c.optim.warmup_steps = 1
        c.async_checkpoints, c.progress_bar = False, False
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg in ("warmup", "smoke_warmup"):
        return warmup_config(smoke=arg == "smoke_warmup")
    c = base_config()
    _model(c)
    c.stage = "rl"
    c.init_from = ""  # the warm-up run's workdir
    c.rl = default_rl_config()
    c.rl.tasks = ml_collections.ConfigDict({"safety": 1.0})
    c.rl.reward = ml_collections.ConfigDict({"weights": {"refusal_match": 1.0}})
    c.rl.group_size = 8
    c.batch_size = 64  # 8 prompts x K=8
    c.seq_len = SEQ_LEN
    for key in ("max_response_tokens", "max_turn_tokens", "tokens_per_iteration"):
        c.rl.rollout[key] = REPLY_TOKENS
    c.rl.sampler.max_slots = 64
    c.rl.sampler.eval_max_new_tokens = REPLY_TOKENS
    c.total_steps = 200  # ~14 min on 2 idle cores; a 40-step run had moved the sampled reward only 0.50 -> 0.58
    c.log_every, c.eval_every, c.checkpoint_every = 5, 25, 50
    c.eval_examples = 38  # every held-out probe: 26 to refuse, 12 to answer
    c.eval_at_start = True
    c.optim.lr = 1e-4  # as experiments/rl_text.py: Muon's scale-free updates collapse the policy at 1e-3
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    if arg == "judge":
        c.rl.reward = ml_collections.ConfigDict({"weights": {"grm": 1.0}, "rubric": REWARD_RUBRIC})
        c.rl.judge = ""  # required: the judge model (see the module docstring)
        c.rl.judge_fallback = -1.0
    elif arg == "smoke":
        _model(c, hidden=64, layers=2)
        c.rl.group_size = 4
        c.batch_size = 8
        for key in ("max_response_tokens", "max_turn_tokens", "tokens_per_iteration"):
            c.rl.rollout[key] = 12
        c.rl.sampler.max_slots = 8
        c.rl.sampler.eval_max_new_tokens = 12
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 2, 2
        c.eval_examples, c.eval_at_start = 6, True
        c.async_checkpoints, c.progress_bar = False, False
    elif arg:
        raise ValueError(f"rl_safety: unknown ARG {arg!r}; use '', warmup, judge, smoke_warmup or smoke.")
    return c


def plot(out: str, run_dirs: list[str]) -> None:
    """Curves of RL runs from their metrics.jsonl: the reward, the held-out refusal and over-refusal rates."""
    from k25.train.metrics import plot_runs

    keys = ("reward", "eval/refusal_rate", "eval/over_refusal", "eval/empty_reply_rate", "response_length",
            "entropy")
    plot_runs(out, run_dirs, keys, xlabel="step", figsize=(13, 7))


if __name__ == "__main__":
    from k25.train.metrics import plot_cli

    plot_cli("experiments.rl_safety", plot)
