"""The quickstart: the tiny K2 (MLA + sigmoid-routed MoE) trained with MuonClip on the embedded synthetic
knowledge / reasoning / code tasks, on a CPU in a few minutes.

    python -m experiments.run --config=experiments/tiny_lm.py --workdir=/tmp/tiny_lm
ARG: "" (default) or "smoke" (a handful of steps, for tests).
"""

from __future__ import annotations

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.model.config import tiny


def get_config(arg: str | None = None):
    c = base_config()
    c.model = model_config_dict(tiny(vocab_size=272, hidden_size=128, num_hidden_layers=4))
    c.data = default_data_config()
    c.data.tokenizer = "byte"
    c.total_steps = 400
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 20
    c.eval_every = 200
    c.checkpoint_every = 200
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.eval_at_start = True
    if arg == "smoke":
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 2, 0, 3
        c.eval_examples = 8
        c.optim.warmup_steps = 2
        c.progress_bar = False
    elif arg:
        raise ValueError(f"tiny_lm: unknown ARG {arg!r}; use '' or 'smoke'.")
    return c
