"""Outcome-based vision RL (report §2.3) on grounding, counting, OCR and chart tasks, with the sandboxed Python
tool, and the Table 2 analog: the text held-out scores before and after vision RL.

    # the start: a K2.5 SFT run, e.g. the zero-vision SFT (experiments/zero_vision_sft.py)
    python -m experiments.run --config=experiments/zero_vision_sft.py:base --workdir=/tmp/zv/base
    python -m experiments.run --config=experiments/zero_vision_sft.py:zero_vision --workdir=/tmp/zv/zero_vision
    # vision RL from it
    python -m experiments.run --config=experiments/rl_vision.py --workdir=/tmp/rl_vision \\
        --config.init_from=/tmp/zv/zero_vision

ARG:
  "" (default)  RL from `init_from` (a K2.5 run directory or HF checkpoint; without one the stage stops and
                names the commands above): K = 4 responses per prompt, Eq. 1, rewards per kind from
                k25.rl.rewards (counting_score, grounding_f1, ocr_score, exact_match for bar heights),
                episodes of up to 2 turns where the policy may call the Python tool (its images bound) or
                answer directly. Logs `eval/accuracy` (mean reward on held-out vision tasks, greedy),
                `eval/solved` (strictly right answers), `eval/tool_call_rate` and `eval/text/*` (held-out
                text exact match and token accuracy) at step 0 and at the end.
  joint         the same with the text task(s) of TEXT_TASKS beside the vision kinds, drawn into the same
                batches (rows with and without images): joint text-vision RL.
  smoke         a few steps of a fresh tiny K2.5 (no init_from), vision and text tasks mixed, for tests.

The model comes from `init_from` (or `config.lm` + `config.vision`); the stage dispatches on that config
having a vision part, so the same file drives any K2.5 size. `python -m experiments.rl_vision plot OUT.png
RUN_DIR...` draws the curves.
"""

from __future__ import annotations

import ml_collections

from experiments import k25_joint
from experiments.common import base_config
from k25.rl.trainer import default_rl_config

KINDS = ("counting", "grounding", "ocr", "chart")
TEXT_TASKS = ("reasoning",)  # synthetic text tasks of `:joint` (chat format, exact-match reward)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or ""
    if arg not in ("", "joint", "smoke"):
        raise ValueError(f"rl_vision: unknown ARG {arg!r}; use '' (default), joint or smoke.")
    c = base_config()
    c.stage = "rl"
    c.init_from = ""  # a K2.5 run directory (e.g. /tmp/zv/zero_vision) or an HF checkpoint directory
    c.dep = False  # --config.dep=True: the encoder by DEP (same numbers)
    c.data = ml_collections.ConfigDict(dict(max_media_tokens_per_row=32))  # prompt images + tool images
    c.vision_token_budget = 0  # per-device encoder tokens; 0 derives it from data.max_media_tokens_per_row
    c.rl = default_rl_config()
    c.rl.tasks = {f"vision/{k}": 1.0 for k in KINDS}
    c.rl.format = "chat"
    c.rl.chat_format = "byte"
    c.rl.thinking = False  # the zero-vision SFT trained the instant format
    c.rl.max_turns = 2  # a tool call and its result, then the answer (or an answer at once)
    c.rl.group_size = 4
    c.batch_size = 16  # 4 prompts x K=4
    c.seq_len = 640  # prompts are ~320-380 byte tokens (the tool declaration included)
    c.rl.rollout.max_response_tokens = 256
    c.rl.rollout.max_turn_tokens = 64
    c.rl.rollout.tokens_per_iteration = 256
    c.rl.sampler.max_slots = 16
    c.rl.sampler.eval_max_new_tokens = 64
    c.rl.sampler.eval_max_response_tokens = 256
    c.rl.vision.text_eval_per_task = 16
    c.total_steps = 20
    c.log_every, c.eval_every, c.checkpoint_every = 5, 0, 10
    c.eval_examples = 6  # held-out tasks per kind
    c.eval_at_start = True
    c.optim.lr = 1e-4  # as rl_text: Muon's updates are scale-free, a pre-training lr collapses the policy
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    if arg == "joint":  # text and vision tasks in one run, one batch: the report's joint multimodal RL
        c.rl.tasks = {**c.rl.tasks.to_dict(), **{t: 1.0 for t in TEXT_TASKS}}
    if arg == "smoke":
        smoke = k25_joint.get_config("smoke")
        c.lm, c.vision = smoke.lm, smoke.vision
        c.lm.vocab_size = 278  # the chat format's byte vocabulary
        # a text task beside the vision ones: batches mix rows with and without images (joint RL)
        c.rl.tasks = {"vision/counting": 1.0, "vision/grounding": 1.0, "reasoning": 1.0}
        c.rl.group_size = 2
        c.batch_size = 4
        c.seq_len = 400
        c.rl.rollout.max_response_tokens = 6
        c.rl.rollout.max_turn_tokens = 6
        c.rl.rollout.tokens_per_iteration = 3  # answers straddle iterations: partial rollouts
        c.rl.sampler.max_slots = 4
        c.rl.sampler.eval_max_new_tokens = 4
        c.rl.sampler.eval_max_response_tokens = 4
        c.rl.vision.text_eval_per_task = 1
        c.rl.vision.text_eval_tasks = ["reasoning"]
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 0, 2
        c.eval_examples = 1
        c.async_checkpoints = False
        c.progress_bar = False
    return c


def plot(out: str, run_dirs: list[str]) -> None:
    """Curves of vision RL runs from their metrics.jsonl, one line per run."""
    from k25.train.metrics import plot_runs

    keys = ("reward", "eval/accuracy", "eval/text/mean_token_acc", "response_length", "tool_call_rate", "entropy")
    plot_runs(out, run_dirs, keys, xlabel="step", figsize=(13, 7))


if __name__ == "__main__":
    from k25.train.metrics import plot_cli

    plot_cli("experiments.rl_vision", plot)
