"""The published Kimi K2 text model (1.04T total / 32B activated) for planning and scaled runs.

    python -m experiments.run --config=experiments/k2_full.py --workdir=DIR --dry_run
builds the run abstractly (no weights allocated), lowers one training step and writes DIR/plan.json.
ARG: "" (bf16 compute over f32 parameters, 4096 context).
"""

from __future__ import annotations

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.model.config import k2_full


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"k2_full: unknown ARG {arg!r}.")
    c = base_config()
    c.model = model_config_dict(k2_full())  # dtype bfloat16, param_dtype float32
    c.data = default_data_config()
    c.data.tokenizer = "byte"  # replace with the K2 tokenizer file for real data: --config.data.tokenizer=PATH
    c.seq_len = 4096
    c.batch_size = 16384  # 67M tokens per step (K2's pre-training batch)
    c.total_steps = 1000
    c.optim.lr = 2e-4
    c.optim.schedule = "wsd"
    c.optim.warmup_steps = 500
    c.optim.qk_clip_tau = 100.0
    c.eval_examples = 0
    return c
