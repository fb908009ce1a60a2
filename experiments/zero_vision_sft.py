"""Zero-vision SFT (report §2.2): does text-only tool-use SFT activate visual tool use?

    # 1. the joint K2.5 base, with the chat-capable byte vocabulary (278)
    python -m experiments.run --config=experiments/zero_vision_sft.py:base --workdir=/tmp/zv/base
    # 2. each arm from it (eval_at_start evaluates the base first)
    python -m experiments.run --config=experiments/zero_vision_sft.py:zero_vision --workdir=/tmp/zv/zero_vision
    python -m experiments.run --config=experiments/zero_vision_sft.py:text_vision --workdir=/tmp/zv/text_vision
    python -m experiments.run --config=experiments/zero_vision_sft.py:none --workdir=/tmp/zv/none

ARG: `zero_vision` (text-only trajectories where Python reads pictures given as text, k25/data/sft/zero_vision.py),
`text_vision` (the same number of conversations and steps of human-designed image trajectories with
crop/rotate/flip steps, k25/data/sft/text_vision.py), `none` (no SFT: the base evaluated), `base` (the joint
stage run the arms start from), `smoke` (a few steps of zero_vision from a fresh tiny K2.5, for tests).
Every arm logs eval/tool_call_rate, eval/code_ok_rate and eval/vision_accuracy on held-out image tasks with
the Python tool (k25/train/sft_eval.py). `--config.init_from` points the arms at another base.
"""

from __future__ import annotations

import ml_collections

from experiments import k25_joint
from experiments.common import base_config
from k25.train.sft import default_sft_data_config
from k25.train.sft_eval import default_agent_eval_config

ARGS = ("zero_vision", "text_vision", "none", "base", "smoke")
BASE_DIR = "/tmp/zv/base"
CONVERSATIONS = 400  # the SFT budget of both arms (conversations generated; 400 steps x batch 4 draws ~ 4 epochs)
# 400 steps, not 100: after 100 steps p(<|tool_calls_section_begin|>) at the first assistant position is ~0.06 even
# on the arms' own training prompts (no tool call possible); after 400 both arms open a call on every held-out
# image task, and an arm takes ~9 min (517-550 s) on 2 shared CPU cores (BUILD_NOTES.md, zero-vision SFT,
# "Longer budget").
STEPS = 400


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in ARGS:
        raise ValueError(f"zero_vision_sft: ARG {arg!r} must be one of {ARGS}.")
    if arg == "base":
        c = k25_joint.get_config("")
        c.lm.vocab_size = 278  # ByteTokenizer(chat=True): the chat format's specials after the byte ones
        c.total_steps = 200
        c.checkpoint_every = 100
        return c
    c = base_config()
    c.stage = "sft"
    c.init_from = BASE_DIR
    c.data = default_sft_data_config()
    c.data.sources = {arg: CONVERSATIONS} if arg in ("zero_vision", "text_vision") else {}
    c.data.drop_long = True
    c.agent_eval = default_agent_eval_config()
    c.agent_eval.per_kind = 3
    c.agent_eval.max_new_tokens = 256
    c.batch_size = 4
    c.seq_len = 1024
    c.total_steps = STEPS
    c.log_every = 10
    c.eval_every = 0  # at the end (and at the start)
    c.eval_at_start = True
    c.eval_examples = 1  # > 0 turns the evals on; their sizes are data.eval_conversations / agent_eval.per_kind
    c.checkpoint_every = 50
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    if arg == "none":  # one step at lr 0 without balancing: the weights stay the base's; the final eval is it
        c.data.sources = {"zero_vision": 8}
        c.total_steps, c.checkpoint_every, c.log_every = 1, 1, 1
        c.optim.lr, c.optim.warmup_steps = 0.0, 0
        c.bias_update_rate = 0.0
        c.eval_at_start = False
    if arg == "smoke":
        c.init_from = ""
        c.lm = k25_joint.get_config("smoke").lm
        c.lm.vocab_size = 278
        c.vision = k25_joint.get_config("smoke").vision
        c.data.sources = {"zero_vision": 4, "text_vision": 2}
        c.data.eval_conversations = 2
        c.agent_eval.kinds = ["counting", "maze"]
        c.agent_eval.per_kind = 1
        c.agent_eval.max_turns = 2
        c.agent_eval.max_new_tokens = 16
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 2, 2, 1, 2
        c.optim.warmup_steps = 1
        c.eval_at_start = False
        c.progress_bar = False
        c.async_checkpoints = False
    return c
