"""What a training stage supplies to the runtime, and the registry the runner dispatches on.

The runtime (`k25.train.loop`) owns the loop, optimizer, checkpoints, metrics and sharding; a stage
owns its model, data, loss and evals. `config.stage` names the stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import ml_collections
from flax import nnx

from k25.train.step import StepConfig

STAGES = {
    "lm": "k25.train.pretrain:TextLMStage",
    "vit": "k25.train.vit_coca:ViTStage",
    "k25": "k25.train.joint:JointStage",
    "rl": "k25.rl.trainer:RLStage",
    "sft": "k25.train.sft:SFTStage",
    "parl": "k25.swarm.parl_stage:ParlStage",
}


class Stage(Protocol):
    config: ml_collections.ConfigDict

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model (called under `nnx.eval_shape` for dry runs)."""

    def loss_fn(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
        """(sum of per-token losses, aux with `num_tokens` and model statistics); see k25.train.step."""

    def step_config(self) -> StepConfig:
        """Accumulation, QK-Clip and balancing settings for the step."""

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global batch, for abstract lowering."""

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        """Endless iterator of host-local batches with grain's get_state/set_state."""

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        """Held-out metrics, keys prefixed `eval/`."""


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    name = config.get("stage", "lm")
    if name not in STAGES:
        raise ValueError(f"config.stage={name!r} is unknown; choose one of {sorted(STAGES)}.")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)(config)
