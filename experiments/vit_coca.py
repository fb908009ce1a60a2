"""The ViT training stage (report §4.3) on the embedded vision tasks, on a CPU in minutes.

    python -m experiments.run --config=experiments/vit_coca.py:coca --workdir=/tmp/vit_coca
ARG picks the phase: "coca" (SigLIP + 2x caption, default), "caption_align" (caption loss through the
projector into a small K2 decoder, ViT updated), "projector_only" (only the projector trains); append
",smoke" (e.g. "coca,smoke") for a few-step run with tiny evals, used by the tests. The report's sequence:

    python -m experiments.run --config=experiments/vit_coca.py:coca --workdir=/tmp/vit/coca
    python -m experiments.run --config=experiments/vit_coca.py:caption_align --workdir=/tmp/vit/align \
        --config.init_from=/tmp/vit/coca
    python -m experiments.run --config=experiments/vit_coca.py:projector_only --workdir=/tmp/vit/proj \
        --config.init_from=/tmp/vit/align
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from experiments.common import base_config, model_config_dict
from k25.data.vision import default_vision_data_config
from k25.model.config import tiny
from k25.model.text_tower import TextTowerConfig
from k25.model.vision_config import MoonViTConfig

PHASES = ("coca", "caption_align", "projector_only")


def vision_config() -> MoonViTConfig:
    """A small MoonViT-3D: 4 blocks of width 96; the 4x4 position table matches the 56-pixel images' grid."""
    return MoonViTConfig(pos_emb_height=4, pos_emb_width=4, num_attention_heads=4, num_hidden_layers=4,
                         hidden_size=96, intermediate_size=256, dtype="float32")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "coca").split(",") if p]
    phase, smoke = parts[0], parts[1:] == ["smoke"]
    if phase not in PHASES or parts[1:] not in ([], ["smoke"]):
        raise ValueError(f"vit_coca: ARG {arg!r} must be one of {PHASES}, optionally followed by ',smoke'.")
    c = base_config()
    c.stage = "vit"
    c.phase = phase
    c.data = default_vision_data_config()
    c.vision = ml_collections.ConfigDict(vision_config().to_dict())
    text = TextTowerConfig()
    c.text_tower = ml_collections.ConfigDict({f.name: getattr(text, f.name) for f in dataclasses.fields(text)
                                              if f.name not in ("vocab_size", "max_len")})
    c.coca = ml_collections.ConfigDict(dict(embed_dim=64, init_log_temperature=math.log(10.0), init_bias=-10.0,
                                            caption_weight=2.0))
    c.lm = model_config_dict(tiny(vocab_size=264, hidden_size=96, num_hidden_layers=2, intermediate_size=256,
                                  n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1))
    c.vision_pack_size = 8  # examples per packed MoonViT sequence (k25.model.coca.encode_in_packs)
    c.batch_size = 64
    c.seq_len = c.data.text_len  # only for the runtime's tokens/s figure
    c.total_steps = 400
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.eval_pool = 32  # retrieval candidates (distinct held-out texts); chance is 1/eval_pool
    c.eval_examples = 32  # held-out samples per task for caption exact match
    c.eval_at_start = True
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-4
    c.optim.trainable = ["mm_projector"] if phase == "projector_only" else []
    # Chain the phases: --config.init_from=<the previous phase's workdir> copies these parts from it.
    c.init_from = ""
    c.init_parts = {"coca": [], "caption_align": ["vision_tower"],
                    "projector_only": ["vision_tower", "mm_projector", "language_model"]}[phase]
    if smoke:
        c.vision_pack_size = 4
        c.batch_size, c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 8, 3, 1, 0, 3
        c.eval_pool, c.eval_examples, c.eval_at_start = 16, 2, False
        c.data.eval_per_task = 16
        # coca's second step is a video batch; the K2.5 phases stay on images (one step compilation)
        c.data.video_every = 2 if phase == "coca" else 0
        c.optim.warmup_steps = 1
        c.progress_bar = False
    return c
