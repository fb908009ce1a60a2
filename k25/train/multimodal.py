"""The multimodal (K2.5) training step: `config.dep` picks the Decoupled Encoder Process or end-to-end backprop.

Both paths read the same planned batch and the same loss, so switching `dep` changes memory and balance,
never the numbers. The host side (`prepare_batch`) turns a raw batch in the HF processor layout (text
arrays, pixel_values + image_grid_thw, pixel_values_videos + video_grid_thw) into fixed-shape arrays: with
dep=True the chunks are balanced over every device of the mesh, with dep=False each goes to the device
that owns its batch row (pipeline stage 0), the conventional layout. The step itself is
`k25.train.step.make_train_step` with the loss from `k25.parallel.dep.step_loss_fn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from k25.model.decoder import K2Model
from k25.model.vision_config import K25Config
from k25.parallel.dep import EmbedsLoss, step_loss_fn
from k25.parallel.dep_plan import VisionPlan, balanced_plan, chunk_rows, media_chunks, rows_plan
from k25.train.pretrain import token_loss_sum
from k25.train.state import ModelDef, TrainState
from k25.train.step import StepConfig, make_train_step

TEXT_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
MEDIA_KEYS = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def multimodal_lm_loss(language_model: K2Model, embeds: jnp.ndarray, batch: dict, media_id: int | None = None
                       ) -> tuple[jnp.ndarray, dict]:
    """Summed next-token cross-entropy over `loss_mask` given input embeddings (media tokens spliced in).

    With `media_id` the aux also splits the sum by modality (`loss_sum/vision`, `loss_tokens/vision` over rows
    holding that media token, `.../text` over the rest), so per-modality loss curves come from training steps.
    """
    out = language_model(inputs_embeds=embeds, positions=batch["positions"], segment_ids=batch["segment_ids"])
    loss, num_tokens = token_loss_sum(out.logits, batch["targets"], batch["loss_mask"])
    aux = {"num_tokens": num_tokens, "max_attn_logits": out.max_attn_logits, "expert_counts": out.expert_counts}
    if media_id is not None:
        vision_rows = jnp.any(batch["input_ids"] == media_id, axis=-1, keepdims=True)
        vision, vision_tokens = token_loss_sum(out.logits, batch["targets"], batch["loss_mask"] * vision_rows)
        aux.update({"loss_sum/vision": vision, "loss_tokens/vision": vision_tokens,
                    "loss_sum/text": loss - vision, "loss_tokens/text": num_tokens - vision_tokens})
    return loss, aux


def dep_enabled(config: Any) -> bool:
    """`config.dep` as a bool (absent: False), rejecting values that are not booleans."""
    value = config.get("dep", False)
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"config.dep={value!r} must be True or False.")
    return bool(value)


def split_microbatches(raw: dict[str, Any], cfg: K25Config, accum_steps: int) -> list[dict[str, Any]]:
    """`accum_steps` raw batches of consecutive rows, each with the media chunks its rows hold."""
    input_ids = np.asarray(raw["input_ids"])
    b = input_ids.shape[0]
    if accum_steps < 1 or b % accum_steps:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1 and divide the batch of {b} rows.")
    if accum_steps == 1:
        return [raw]
    chunks = media_chunks(raw, cfg)
    rows = chunk_rows(input_ids, chunks, cfg)
    n = b // accum_steps
    out = []
    for m in range(accum_steps):
        micro: dict[str, Any] = {k: np.asarray(raw[k])[m * n:(m + 1) * n] for k in TEXT_KEYS}
        for kind, px_key, grid_key in MEDIA_KEYS:
            mine = [c for c, r in zip(chunks, rows) if c.kind == kind and m * n <= r < (m + 1) * n]
            if mine:  # chunk order follows the rows, so a microbatch's chunks are one contiguous run
                end = mine[-1].pixel_start + mine[-1].patches
                micro[px_key] = np.asarray(raw[px_key])[mine[0].pixel_start:end]
                micro[grid_key] = np.asarray([c.grid for c in mine], np.int64)
        out.append(micro)
    return out


def prepare_batch(raw: dict[str, Any], cfg: K25Config, mesh: Mesh, *, dep: bool, accum_steps: int = 1,
                  bin_size: int | None = None, patch_budget: int | None = None, token_budget: int | None = None
                  ) -> tuple[dict[str, np.ndarray], list[VisionPlan]]:
    """Host arrays for the step (text arrays + the plans' `vision/*` and `media_src`) and the plan of each
    microbatch.

    With accumulation every microbatch is planned on its own (its `media_src` points into its own encoder
    outputs) and the plans are stacked on axis 0, which is how `k25.train.step` slices microbatches.
    Budgets default to the largest need over the microbatches, so they share one shape. `bin_size`: see
    `k25.parallel.dep_plan.plan_vision` (attention runs per bin of that many patches).
    """
    missing = [k for k in TEXT_KEYS if k not in raw]
    if missing:
        raise ValueError(f"batch is missing {missing}; a multimodal batch needs {list(TEXT_KEYS)}.")
    micro = split_microbatches(raw, cfg, accum_steps)

    rows = np.shape(raw["input_ids"])[0]

    def plan(m: int, **budgets: int | None) -> VisionPlan:
        if dep:
            return balanced_plan(micro[m], cfg, mesh.size, bin_size=bin_size, **budgets)
        return rows_plan(micro[m], cfg, dict(mesh.shape), global_rows=rows, row_offset=m * rows // accum_steps,
                         bin_size=bin_size, **budgets)

    plans = [plan(m, patch_budget=patch_budget, token_budget=token_budget) for m in range(accum_steps)]
    if len(plans) > 1 and (patch_budget is None or token_budget is None):
        p = patch_budget or max(math.prod(pl.arrays["vision/patches"].shape[1:3]) for pl in plans)
        t = token_budget or max(pl.arrays["vision/merge_index"].shape[1] for pl in plans)
        plans = [plan(m, patch_budget=p, token_budget=t) for m in range(accum_steps)]
    arrays = {k: np.concatenate([pl.arrays[k] for pl in plans]) for k in plans[0].arrays}
    return {**{k: np.asarray(raw[k]) for k in TEXT_KEYS}, **arrays}, plans


def make_multimodal_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                               step_cfg: StepConfig, mesh: Mesh, *, dep: bool,
                               loss_fn: EmbedsLoss = multimodal_lm_loss
                               ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The un-jitted `(state, batch) -> (state, metrics)`; jit it under `jax.set_mesh(mesh)` like the runtime.

    `step_cfg.text_path` should be ("language_model",) so QK-Clip and balancing find the K2 decoder. With
    `step_cfg.accum_steps` > 1 the batch must come from `prepare_batch(..., accum_steps=...)`.
    """
    return make_train_step(model_def, step_loss_fn(loss_fn, mesh, dep=dep), optimizer, schedule, step_cfg)


def planned_batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """Text arrays split by rows over the batch axes; `vision/*` split by device over every mesh axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from k25.parallel.mesh import batch_sharding

    per_device = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return {k: per_device if k.startswith("vision/") else batch_sharding(mesh) for k in batch}


def device_put_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a planned host batch with `planned_batch_shardings`."""
    return jax.device_put(batch, planned_batch_shardings(batch, mesh))
