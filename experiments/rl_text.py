"""Text RL on synthetic checkable tasks: the tiny K2 warmed up on the tasks, then Eq. 1 with rollouts from
the in-process sampler.

    python -m experiments.run --config=experiments/rl_text.py:warmup --workdir=/tmp/rl_text/warmup
    python -m experiments.run --config=experiments/rl_text.py --workdir=/tmp/rl_text/rl \\
        --config.init_from=/tmp/rl_text/warmup

ARG:
  warmup        the `lm` stage on the reasoning task (prompt -> answer, loss on answers): the SFT-style start,
                50 steps (held-out 0.28; 150 steps reach 0.71, which leaves RL too little headroom to measure).
  "" (default)  RL from `init_from`: exact-match reward, K=8, Eq. 1, dynamic sampling (groups with equal
                rewards dropped), 480 steps; `eval/accuracy` at step 0, every 40 steps and at the end.
  toggle_warmup the `lm` stage on the stepwise task (worked steps, 0-2 redundant re-checks, then "Answer: N"):
                responses of one problem vary ~2.5x in length at equal correctness.
  toggle        RL from the toggle warm-up with Toggle (Eq. 2) on; `toggle_off` is the same run with Toggle
                off. Compare `response_length` (sampled) and `eval/response_length` at matched accuracy.
  mismatch_k25 | mismatch_none | mismatch_tis | mismatch_icepop
                the sampler in bfloat16 (weights and compute) while the trainer runs float32: Eq. 1 against
                no correction, truncated importance sampling and IcePop.
  noise_k25 | noise_none | noise_tis | noise_icepop
                the same four with a mismatch the corrections act on: the rollout sampler's weights get seeded
                multiplicative noise (`rl.sampler.weight_noise`, k25.rl.weight_noise), the trainer's do not.
  smoke         a few steps of a smaller model, for tests.

`python -m experiments.rl_text plot OUT.png RUN_DIR...` draws the curves of runs (rewards, eval/accuracy,
response length, mean |log-ratio|, masked fraction, entropy, dropped groups) from their metrics.jsonl.
"""

from __future__ import annotations

import ml_collections

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.model.config import tiny
from k25.rl.trainer import default_rl_config

MISMATCH = ("k25", "none", "tis", "icepop")
TOGGLE_WARMUP_STEPS = 300
NOISE = 0.2  # relative weight noise of the `noise_*` sampler
NOISE_STEPS = 160
TOGGLE_RL_STEPS = 200


def _model(c: ml_collections.ConfigDict, hidden: int = 128, layers: int = 4) -> None:
    c.model = model_config_dict(tiny(vocab_size=272, hidden_size=hidden, num_hidden_layers=layers))
    c.data = default_data_config()
    c.data.tokenizer = "byte"
    c.data.sources = {"reasoning": 1.0}


def warmup_config() -> ml_collections.ConfigDict:
    c = base_config()
    _model(c)
    c.total_steps, c.batch_size, c.seq_len = 50, 16, 64
    c.log_every, c.eval_every, c.checkpoint_every = 25, 0, 50
    c.optim.lr, c.optim.warmup_steps = 3e-3, 20
    c.eval_examples, c.eval_at_start = 100, False
    return c


def toggle_warmup_config() -> ml_collections.ConfigDict:
    c = warmup_config()
    c.data.sources = {"stepwise": 1.0}
    c.seq_len = 96  # bos + prompt (14) + the longest response (71) + eos
    c.total_steps, c.checkpoint_every = TOGGLE_WARMUP_STEPS, TOGGLE_WARMUP_STEPS
    c.eval_max_new_tokens = 80
    return c


def _toggle_task(c: ml_collections.ConfigDict) -> None:
    """The stepwise task for the Toggle pair; the two runs differ only in `rl.toggle.enabled`."""
    c.data.sources = {"stepwise": 1.0}
    c.rl.tasks = {"stepwise": 1.0}
    c.seq_len = 96
    for k in ("max_response_tokens", "max_turn_tokens", "tokens_per_iteration"):
        c.rl.rollout[k] = 80  # the longest response is 71 tokens: no correct answer is ever cut off
    c.rl.sampler.eval_max_new_tokens = 80
    c.rl.toggle.m = 5
    c.total_steps, c.eval_every, c.checkpoint_every = TOGGLE_RL_STEPS, 20, TOGGLE_RL_STEPS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg == "warmup":
        return warmup_config()
    if arg == "toggle_warmup":
        return toggle_warmup_config()
    c = base_config()
    _model(c)
    c.stage = "rl"
    c.init_from = ""  # the warm-up run's workdir
    c.rl = default_rl_config()
    c.rl.group_size = 8
    c.batch_size = 64  # 8 prompts x K=8
    c.rl.drop_uniform_groups = True  # DAPO's dynamic sampling: every group in the batch carries a signal
    c.seq_len = 48
    c.rl.rollout.max_response_tokens = 12
    c.rl.rollout.max_turn_tokens = 12
    c.rl.rollout.tokens_per_iteration = 12
    c.rl.sampler.max_slots = 64
    c.rl.sampler.eval_max_new_tokens = 12
    c.total_steps = 480  # ~13 min on 2 cores; held-out accuracy moves little before step ~240
    c.log_every, c.eval_every, c.checkpoint_every = 5, 40, 240
    c.eval_examples = 100  # held-out reasoning prompts
    c.eval_at_start = True
    c.optim.lr = 1e-4  # Muon updates are scale-free: 1e-3 (a third of the warm-up peak) collapsed the policy
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0  # RL moves the warmed-up weights a little; no pull towards zero
    if arg in ("toggle", "toggle_off"):
        _toggle_task(c)
        c.rl.toggle.enabled = arg == "toggle"
    elif arg.startswith(("mismatch_", "noise_")):
        kind, _, corr = arg.partition("_")
        if corr not in MISMATCH:
            raise ValueError(f"rl_text: unknown ARG {arg!r}; variants: {[kind + '_' + m for m in MISMATCH]}")
        c.rl.loss.correction = corr
        c.model.dtype = "float32"
        if kind == "mismatch":
            c.rl.sampler.dtype = "bfloat16"
            c.total_steps, c.eval_every, c.checkpoint_every = 30, 10, 30
        else:  # a mismatch large enough for the corrections to act on (k25.rl.weight_noise)
            c.rl.sampler.weight_noise = NOISE
            c.total_steps, c.eval_every, c.checkpoint_every = NOISE_STEPS, 40, NOISE_STEPS
    elif arg == "smoke":
        _model(c, hidden=64, layers=2)
        c.rl.group_size = 4
        c.batch_size = 8
        c.seq_len = 48
        c.rl.rollout.max_response_tokens = 6
        c.rl.rollout.max_turn_tokens = 6
        c.rl.rollout.tokens_per_iteration = 3  # answers straddle iterations: partial rollouts
        c.rl.sampler.max_slots = 8
        c.rl.sampler.eval_max_new_tokens = 6
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 0, 2
        c.eval_examples, c.eval_at_start = 4, False
        c.async_checkpoints = False
        c.progress_bar = False
        c.rl.drop_uniform_groups = False  # an untrained policy's groups are all wrong: nothing would be left
    elif arg:
        raise ValueError(f"rl_text: unknown ARG {arg!r}; use '', warmup, toggle_warmup, toggle, toggle_off, smoke, "
                         "mismatch_* or noise_*.")
    return c


def plot(out: str, run_dirs: list[str]) -> None:
    """Curves of RL runs from their metrics.jsonl, one line per run."""
    from k25.train.metrics import plot_runs

    # with dynamic sampling `reward` is the kept groups' mean; `reward_all_groups` is every sampled group's
    keys = (
        "reward",
        "reward_all_groups",
        "eval/accuracy",
        "response_length",
        "mean_abs_log_ratio",
        "masked_fraction",
        "entropy",
        "dropped_uniform_groups",
    )
    plot_runs(out, run_dirs, keys, xlabel="step", figsize=(17, 7))


if __name__ == "__main__":
    from k25.train.metrics import plot_cli

    plot_cli("experiments.rl_text", plot)
