"""The report's early-fusion ablation (§2.1, Table 1): when and at what ratio vision data enters joint pre-training.

    python -m experiments.run --config=experiments/early_fusion.py:early --workdir=/tmp/ef/early/seed_0
    python -m experiments.ablate early_fusion --seeds 3 --workdir=/tmp/ef     # every arm x seed, the table
ARG: "early" (vision from 0 % of the run at 10:90 vision:text), "mid" (from 50 % at 20:80) or "late" (from 80 %
at 50:50); append ",smoke" for a few-step run used by the tests. All arms spend the same total text and vision
token budgets: every arm's vision share of the run is VISION_SHARE, so the text-only prefix is computed from
it (`injection_for_budget`), exactly as the report trains "text-only tokens for a specifically calculated
number of tokens before introducing vision data". The model and data are the k25 joint stage's
(experiments/k25_joint.py); `--config.init_text_from=DIR` starts every arm from a text run's decoder.
"""

from __future__ import annotations

import ml_collections

from experiments import k25_joint
from k25.data.mixture import injection_for_budget
from k25.train.joint_eval import TABLE1_COLUMNS

VISION_SHARE = 0.1  # vision tokens / all tokens, the same in every arm
ARMS = {"early": 0.1, "mid": 0.2, "late": 0.5}  # arm -> vision ratio after the injection point
# The report's Table 1 (columns in TABLE1_COLUMNS order: vision knowledge, vision reasoning, OCR, text
# knowledge, text reasoning, code).
REPORT_TABLE1 = {"early": (25.8, 43.8, 65.7, 45.5, 58.5, 24.8), "mid": (25.0, 40.7, 64.1, 43.9, 58.6, 24.0),
                 "late": (24.2, 39.0, 61.5, 43.1, 57.8, 24.0)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    if not parts or parts[0] not in ARMS or parts[1:] not in ([], ["smoke"]):
        raise ValueError(f"early_fusion: ARG {arg!r} must be one of {sorted(ARMS)}, optionally followed by ',smoke'.")
    arm, smoke = parts[0], parts[1:] == ["smoke"]
    c = k25_joint.get_config("smoke" if smoke else "")
    c.arm = arm
    c.data.text_rows = 0
    c.data.vision_ratio = ARMS[arm]
    c.data.inject_at = injection_for_budget(VISION_SHARE, ARMS[arm])
    c.init_text_from = ""  # workdir of an `lm` run with the same decoder: start from its text model
    c.batch_size = 8
    c.seq_len = 128
    c.total_steps = 250  # injection at steps 0 / 125 / 200; 200 vision rows of 2000 in every arm
    c.log_every = 10
    c.eval_every = 0  # evaluate once, at the end
    c.checkpoint_every = 100
    c.eval_examples = 16  # held-out image rows for eval/caption_loss
    c.eval_per_task = 32  # held-out documents per task for the Table 1 columns (k25.train.joint_eval)
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    c.progress_bar = False
    if smoke:
        # 10 steps: injection at 0 / 5 / 8, 8 x 10 x 0.1 = 8 vision rows in every arm
        c.batch_size, c.seq_len, c.total_steps = 8, 96, 10
        c.log_every, c.checkpoint_every = 1, 5
        c.eval_examples, c.eval_per_task = 2, 2
        c.optim.warmup_steps = 1
        c.async_checkpoints = False
    return c


COLUMNS = [(f"eval/table1/{key}", title) for key, title in zip(TABLE1_COLUMNS, (
    "Vision Knowledge", "Vision Reasoning", "OCR", "Text Knowledge", "Text Reasoning", "Code"))]
EXTRA_COLUMNS = [(f"{key}_token_acc", f"{title} (token acc.)") for key, title in COLUMNS]
EXTRA_TITLE = "Answer-token accuracy in % (teacher-forced; finer-grained than exact match at this scale):"
CURVES = {"text": ("loss_sum/text", "loss_tokens/text"), "vision": ("loss_sum/vision", "loss_tokens/vision")}
