"""The Decoupled Encoder Process (DEP, report §4.5.1): the vision encoder leaves the backbone's parallel layout.

A step runs in three phases:

  (a) balanced vision forward: the encoder (MoonViT-3D + projector) is replicated on every device and each
      device encodes the chunks `k25.parallel.dep_plan` gave it (balanced by patch count over the whole
      global batch). Only the projected tokens are kept; nothing is differentiated, so no activation lives on.
  (b) backbone forward and backward: the K2 decoder takes the text embeddings with the vision tokens spliced
      in as a leaf input (a stop-gradient boundary) and returns the LLM gradients *and* the gradient at the
      vision tokens. The backbone keeps whatever layout text-only training uses (EP, ZeRO-1, ...).
  (c) vision recompute and backward: `jax.vjp` of the same sharded encoder at the same inputs, pulled back
      with the cotangent from (b). The parameters enter `shard_map` replicated, so its transpose sums the
      per-device encoder gradients over every mesh axis (the all-reduce of the report).

The peak memory of the step is then max(encoder forward, backbone, encoder backward) rather than their sum,
and the encoder's load does not depend on which rows (or pipeline stage) its images belong to. An
`optimization_barrier` ties (c)'s inputs to (b)'s output: without it XLA may CSE the recompute with (a) and
keep (a)'s activations alive across (b), which is exactly what DEP avoids.

`end_to_end_value_and_grad` is the dep=False twin on the same batch and the same loss function: one
`jax.value_and_grad` through the sharded encoder, activations saved. `reference_loss_fn` is the plain
`K25Model` (unsharded, grids as static host data) both must agree with.

Loss functions take `(language_model, embeds, batch) -> (loss_sum, aux)` (see `k25.train.step`); the batch
holds the text arrays the loss reads plus the `vision/*` and `media_src` arrays of a `VisionPlan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from k25.model.decoder import K2Model, scan_layers
from k25.model.k25 import K25Model
from k25.model.moonvit import MoonViT, axial_rope_cos_sin, sincos_time_table
from k25.model.projector import Projector
from k25.parallel.dep_plan import TAPS
from k25.train.state import ModelDef, split_model

EmbedsLoss = Callable[[K2Model, jnp.ndarray, dict], tuple[jnp.ndarray, dict]]
ValueAndGrad = tuple[tuple[jnp.ndarray, dict], dict]
VISION_KEYS = ("patches", "segment_ids", "positions", "frame_index", "row_taps", "row_weights", "col_taps",
               "col_weights", "merge_index", "merge_count")
_PER_TOKEN = ("merge_index", "merge_count")  # indexed by encoder output token, not by patch
PARTS = ("vision_tower", "mm_projector", "language_model")


class VisionEncoder(nnx.Module):
    """The replicated half of K2.5 under DEP: MoonViT-3D and the projector (shares the model's modules)."""

    def __init__(self, vision_tower: MoonViT, mm_projector: Projector):
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector

    def __call__(self, v: dict[str, jnp.ndarray]) -> jnp.ndarray:
        """One device's packed chunks (a `VisionPlan` row, no device axis) -> (T, D_text) projected tokens.

        MoonViT.__call__ with its layout read from arrays instead of static grids; every module is reused.
        Per-patch arrays come as (n_bins, bin_size, ...): the blocks run bin by bin (vmap), so attention is
        block-diagonal per bin and its cost n_bins * bin_size^2; everything else sees the flat pack.
        """
        tower = self.vision_tower
        cfg = tower.cfg
        n_bins, size = v["segment_ids"].shape
        flat = {k: x.reshape(n_bins * size, *x.shape[2:]) for k, x in v.items() if k not in _PER_TOKEN}
        h = tower.patch_embed.proj(flat["patches"])
        h = h + self._positions(flat).astype(h.dtype)
        cos, sin = axial_rope_cos_sin(flat["positions"], cfg.head_dim, cfg.rope_theta)
        seg = v["segment_ids"]

        def blocks(x, c, s, mask):
            return scan_layers(tower.layers, x, c, s, mask)[0]

        bins = (h.reshape(n_bins, size, -1), cos.reshape(n_bins, size, -1), sin.reshape(n_bins, size, -1))
        h = jax.vmap(blocks)(*bins, seg[:, :, None] == seg[:, None, :]).reshape(n_bins * size, -1)
        h = tower.final_layernorm(h)
        padded = jnp.concatenate([h.astype(jnp.float32), jnp.zeros((1, h.shape[-1]), jnp.float32)])
        pooled = padded[v["merge_index"]].sum(axis=1) / v["merge_count"][:, None, None]
        return self.mm_projector(pooled.astype(h.dtype))

    def _positions(self, v: dict[str, jnp.ndarray]) -> jnp.ndarray:
        """(N, D) float32: the bicubically resampled position table at each patch, plus its time row.

        Sixteen (N, D) gathers of the table weighted by the host-computed taps, accumulated one at a time
        so no (N, 16, D) intermediate exists.
        """
        cfg = self.vision_tower.cfg
        table = self.vision_tower.patch_embed.position_embeddings[...].astype(jnp.float32)
        spatial = jnp.zeros((v["row_taps"].shape[0], cfg.hidden_size), jnp.float32)
        for b in range(TAPS):
            col = jnp.zeros_like(spatial)
            for a in range(TAPS):
                col = col + v["row_weights"][:, a, None] * table[v["row_taps"][:, a], v["col_taps"][:, b]]
            spatial = spatial + v["col_weights"][:, b, None] * col
        time = jnp.asarray(sincos_time_table(cfg.pos_emb_time, cfg.hidden_size))[v["frame_index"]]
        return spatial + time


# ------------------------------------------------------------------------------------------- helpers
def check_inputs(params: dict, batch: dict, mesh: Mesh) -> None:
    """ValueErrors naming the missing or inconsistent field, before anything is traced deeply."""
    missing = [p for p in PARTS if p not in params]
    if missing:
        raise ValueError(f"params is missing {missing}: DEP needs a K25Model's params (vision_tower, "
                         "mm_projector, language_model).")
    check_batch(batch, mesh)


def check_batch(batch: dict, mesh: Mesh) -> None:
    """The planned arrays are present, planned for this mesh, and `media_src` matches `input_ids`."""
    for k in [f"vision/{k}" for k in VISION_KEYS] + ["media_src", "input_ids"]:
        if k not in batch:
            raise ValueError(f"batch[{k!r}] is missing; build it with k25.parallel.dep_plan.plan_vision.")
    n = batch["vision/patches"].shape[0]
    if n != mesh.size:
        raise ValueError(f"batch['vision/patches'] is planned for {n} devices but the mesh has {mesh.size}; "
                         "plan with n_devices = mesh.size.")
    if batch["media_src"].shape != batch["input_ids"].shape:
        raise ValueError(f"batch['media_src'] {batch['media_src'].shape} must have input_ids' shape "
                         f"{batch['input_ids'].shape}.")


def _vision_inputs(batch: dict) -> dict[str, jnp.ndarray]:
    return {k: batch[f"vision/{k}"] for k in VISION_KEYS}


def _encoder_parts(model_def: ModelDef, params: dict, buffers: dict) -> tuple[ModelDef, dict, dict]:
    """ModelDef and pure dicts of the encoder alone (its params are the model's vision subtrees)."""
    model = model_def.merge(params, buffers)
    return split_model(VisionEncoder(model.vision_tower, model.mm_projector))


def encode_sharded(enc_def: ModelDef, enc_params: dict, enc_buffers: dict, vision: dict[str, jnp.ndarray],
                   mesh: Mesh) -> jnp.ndarray:
    """Every device encodes its own planned pack with replicated weights: (n_devices * T, D_text) tokens."""
    spec = P(tuple(mesh.axis_names))

    def local(p: dict, b: dict, v: dict) -> jnp.ndarray:
        return enc_def.merge(p, b)(jax.tree.map(lambda x: x[0], v))[None]

    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), spec), out_specs=spec)(enc_params, enc_buffers, vision)
    return out.reshape(-1, out.shape[-1])


def splice(language_model: K2Model, input_ids: jnp.ndarray, media_src: jnp.ndarray,
           feats: jnp.ndarray) -> jnp.ndarray:
    """Text embeddings with each placeholder replaced by feats[media_src] (K25Model.embed, plan-driven)."""
    is_media = media_src >= 0
    embeds = language_model.embed(jnp.where(is_media, 0, input_ids))  # placeholder ids may be >= vocab
    picked = feats.astype(embeds.dtype)[jnp.maximum(media_src, 0)]
    return jnp.where(is_media[..., None], picked, embeds)


# -------------------------------------------------------------------------------------- the phases
def vision_forward(enc_def: ModelDef, enc_params: dict, enc_buffers: dict, batch: dict, mesh: Mesh) -> jnp.ndarray:
    """Phase (a): outputs only. Not differentiated, so no encoder activation outlives it."""
    return jax.lax.stop_gradient(encode_sharded(enc_def, enc_params, enc_buffers, _vision_inputs(batch), mesh))


def backbone_value_and_grad(model_def: ModelDef, params: dict, buffers: dict, batch: dict, feats: jnp.ndarray,
                            loss_fn: EmbedsLoss) -> tuple[tuple[jnp.ndarray, dict], dict, jnp.ndarray]:
    """Phase (b): ((loss_sum, aux), LLM grads, d loss / d feats) with the vision tokens as a leaf input."""

    def loss(lm_params: dict, f: jnp.ndarray):
        lm = model_def.merge({**params, "language_model": lm_params}, buffers).language_model
        return loss_fn(lm, splice(lm, batch["input_ids"], batch["media_src"], f), batch)

    value, (lm_grads, d_feats) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params["language_model"], feats)
    return value, lm_grads, d_feats


def vision_backward(enc_def: ModelDef, enc_params: dict, enc_buffers: dict, batch: dict, d_feats: jnp.ndarray,
                    mesh: Mesh) -> dict:
    """Phase (c): recompute the encoder and pull `d_feats` back; gradients summed over all devices."""
    enc_params, vision, d_feats = jax.lax.optimization_barrier((enc_params, _vision_inputs(batch), d_feats))
    _, pull = jax.vjp(lambda p: encode_sharded(enc_def, p, enc_buffers, vision, mesh), enc_params)
    return pull(d_feats)[0]


def dep_value_and_grad(model_def: ModelDef, params: dict, buffers: dict, batch: dict, loss_fn: EmbedsLoss,
                       mesh: Mesh) -> ValueAndGrad:
    """((loss_sum, aux), grads for every parameter) by DEP; the structure of `jax.value_and_grad(has_aux)`."""
    check_inputs(params, batch, mesh)
    enc_def, enc_params, enc_buffers = _encoder_parts(model_def, params, buffers)
    feats = vision_forward(enc_def, enc_params, enc_buffers, batch, mesh)
    value, lm_grads, d_feats = backbone_value_and_grad(model_def, params, buffers, batch, feats, loss_fn)
    enc_grads = vision_backward(enc_def, enc_params, enc_buffers, batch, d_feats, mesh)
    return value, {**enc_grads, "language_model": lm_grads}


# ------------------------------------------------------------------------- the twins and step hooks
def embeds_loss(model: K25Model, batch: dict, loss_fn: EmbedsLoss, mesh: Mesh) -> tuple[jnp.ndarray, dict]:
    """The planned batch's loss through the sharded encoder, differentiable end to end (the dep=False path)."""
    enc = VisionEncoder(model.vision_tower, model.mm_projector)
    enc_def, enc_params, enc_buffers = split_model(enc)
    feats = encode_sharded(enc_def, enc_params, enc_buffers, _vision_inputs(batch), mesh)
    lm = model.language_model
    return loss_fn(lm, splice(lm, batch["input_ids"], batch["media_src"], feats), batch)


def end_to_end_value_and_grad(model_def: ModelDef, params: dict, buffers: dict, batch: dict, loss_fn: EmbedsLoss,
                              mesh: Mesh) -> ValueAndGrad:
    """DEP's twin for dep=False: one `jax.value_and_grad` over the same encoder layout and loss."""
    check_inputs(params, batch, mesh)
    return jax.value_and_grad(lambda p: embeds_loss(model_def.merge(p, buffers), batch, loss_fn, mesh),
                              has_aux=True)(params)


def reference_loss_fn(loss_fn: EmbedsLoss) -> Callable[[K25Model, dict], tuple[jnp.ndarray, dict]]:
    """The plain K25Model loss on a raw batch (pixel arrays + grids as host data): the unsharded twin."""

    def fn(model: K25Model, batch: dict) -> tuple[jnp.ndarray, dict]:
        embeds = model.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"),
                             batch.get("pixel_values_videos"), batch.get("video_grid_thw"))
        return loss_fn(model.language_model, embeds, batch)

    return fn


def step_loss_fn(loss_fn: EmbedsLoss, mesh: Mesh, *, dep: bool) -> Callable[[nnx.Module, dict], Any]:
    """A `(model, batch) -> (loss_sum, aux)` for `k25.train.step.make_train_step`, DEP or end to end.

    With dep=True the loss is a `jax.custom_vjp` whose forward runs phases (a) and (b) and whose backward
    runs phase (c), so the runtime's `jax.value_and_grad` (accumulation, optimizer, QK-Clip, skipping of
    non-finite steps) is used unchanged and receives exactly `dep_value_and_grad`'s gradients.
    """
    if not dep:
        def end_to_end(model: nnx.Module, batch: dict) -> tuple[jnp.ndarray, dict]:
            check_batch(batch, mesh)
            return embeds_loss(model, batch, loss_fn, mesh)

        return end_to_end

    def fn(model: nnx.Module, batch: dict) -> tuple[jnp.ndarray, dict]:
        model_def, params, buffers = split_model(model)
        check_inputs(params, batch, mesh)
        return _dep_custom_vjp(model_def, loss_fn, mesh)(params, buffers, batch)

    return fn


def _dep_custom_vjp(model_def: ModelDef, loss_fn: EmbedsLoss, mesh: Mesh) -> Callable:
    @jax.custom_vjp
    def loss(params: dict, buffers: dict, batch: dict):
        return embeds_loss(model_def.merge(params, buffers), batch, loss_fn, mesh)

    def fwd(params, buffers, batch):
        enc_def, enc_params, enc_buffers = _encoder_parts(model_def, params, buffers)
        feats = vision_forward(enc_def, enc_params, enc_buffers, batch, mesh)
        value, lm_grads, d_feats = backbone_value_and_grad(model_def, params, buffers, batch, feats, loss_fn)
        return value, (params, buffers, batch, lm_grads, d_feats)

    def bwd(res, cotangents):
        params, buffers, batch, lm_grads, d_feats = res
        g = cotangents[0]  # d(outer objective)/d(loss_sum); aux carries no gradient
        enc_def, enc_params, enc_buffers = _encoder_parts(model_def, params, buffers)
        enc_grads = vision_backward(enc_def, enc_params, enc_buffers, batch, d_feats * g, mesh)
        grads = {**enc_grads, "language_model": jax.tree.map(lambda x: x * g, lm_grads)}
        return grads, jax.tree.map(jnp.zeros_like, buffers), jax.tree.map(_zero_cotangent, batch)

    loss.defvjp(fwd, bwd)
    return loss


def _zero_cotangent(x: jnp.ndarray) -> jnp.ndarray:
    """Zero cotangent of a batch leaf: float0 for integer arrays, as JAX requires."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)
