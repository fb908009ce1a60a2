"""Joint K2.5 training (MoonViT-3D + projector + K2 decoder) on interleaved image-text rows, DEP switchable.

    python -m experiments.run --config=experiments/k25_joint.py --workdir=/tmp/k25_joint [--config.dep=True]
ARG "" is a short CPU run; "smoke" is a few steps with tiny evals, used by the tests. `--config.dep=True`
runs the vision encoder by the Decoupled Encoder Process (k25.parallel.dep): same losses, the encoder
balanced over every device. On a host with several devices set `--config.mesh.dp/ep` so their product is
the device count (e.g. 8 fake CPU devices: `--config.mesh.dp=2 --config.mesh.ep=4`).
"""

from __future__ import annotations

import ml_collections

from experiments.common import base_config, model_config_dict
from k25.model.config import tiny
from k25.model.vision_config import MoonViTConfig
from k25.train.joint import default_joint_data_config


def vision_config() -> MoonViTConfig:
    """A small MoonViT-3D; the 8x8 position table matches the largest (112-pixel) images' grid."""
    return MoonViTConfig(pos_emb_height=8, pos_emb_width=8, num_attention_heads=2, num_hidden_layers=2,
                         hidden_size=32, intermediate_size=64, dtype="float32")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if (arg or "") not in ("", "smoke"):
        raise ValueError(f"k25_joint: ARG {arg!r} must be '' or 'smoke'.")
    c = base_config()
    c.stage = "k25"
    c.dep = False  # --config.dep=True: Decoupled Encoder Process (same numbers, balanced encoder)
    c.data = default_joint_data_config()
    c.vision = ml_collections.ConfigDict(vision_config().to_dict())
    c.lm = model_config_dict(tiny(vocab_size=264, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                  moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                  topk_group=1))
    c.vision_token_budget = 0  # per-device encoder tokens; 0 derives the worst case from the data config
    c.batch_size = 16
    c.seq_len = 128
    c.total_steps = 200
    c.log_every = 20
    c.eval_every = 100
    c.checkpoint_every = 100
    c.eval_examples = 16  # held-out image rows for eval/caption_loss
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    if arg == "smoke":
        c.batch_size, c.seq_len = 8, 96
        c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 0, 2
        c.eval_examples = 2
        c.optim.warmup_steps = 1
        c.progress_bar = False
        c.async_checkpoints = False
    return c
