"""The ViT training stage (report §4.3): MoonViT-3D trained on image-text and video-text pairs.

`config.phase` picks the report's phases, in the order they run:

* "coca"           - CoCa pre-training: SigLIP sigmoid loss (learnable temperature and bias, initialised at
                     log 10 and -10) between pooled MoonViT embeddings and a small text encoder, plus
                     `caption_weight` (2) x caption cross-entropy through a small cross-attending decoder.
* "caption_align"  - caption loss only, through the K2.5 path (MoonViT -> projector -> K2 decoder, the vision
                     tokens in front of the text; see `caption_forward`); the ViT is updated. The report aligns to a
                     trained Moonlight; here the small K2 starts untrained, so by default it trains as well
                     (`config.optim.trainable` narrows what trains).
* "projector_only" - the same caption loss with only `mm_projector` trainable (the short bridge to the big LLM).

Phases chain through `config.init_from` (a finished run's workdir) and `config.init_parts` (top-level modules
copied from its latest checkpoint): caption_align takes `vision_tower` from a coca run, projector_only takes
every part from a caption_align run. Everything else starts fresh from `config.seed`.

Loss normalisation follows the runtime's contract (sum of per-item losses, divided once by the count): for
CoCa the items are examples and the sum is sum_i siglip_row_i + caption_weight * b * mean caption CE, so the
logged loss is the mean SigLIP row loss plus caption_weight x the mean per-token caption CE.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from k25.data.tokenizer import load_tokenizer
from k25.data.vision import VisionTextData, make_vision_iterator
from k25.model.coca import CoCa, CoCaConfig, encode_in_packs
from k25.model.config import K2Config
from k25.model.decoder import DecoderOutput
from k25.model.k25 import K25Model
from k25.model.text_tower import TextTowerConfig
from k25.model.vision_config import K25Config, MoonViTConfig
from k25.train.init_from import copy_into, latest_params
from k25.train.step import StepConfig
from k25.train.vision_losses import caption_cross_entropy, siglip_loss
from k25.train.vit_eval import Evaluator

PHASES = ("coca", "caption_align", "projector_only")


def load_parts(workdir: str, parts: tuple[str, ...]) -> dict[str, Any]:
    """{part: {"params": ..., "buffers": ...}} pure dicts (numpy) from the latest checkpoint under `workdir`
    ({} when workdir is empty). Buffers (the MoE routing biases) come along: routing depends on them."""
    state = latest_params(workdir, "config.init_from")
    if not state:
        return {}
    missing = [p for p in parts if p not in state["params"]]
    if missing:
        raise ValueError(f"config.init_parts {missing} are not in {state['path']}; it has "
                         f"{sorted(state['params'])}.")
    return {p: {k: state[k].get(p, {}) for k in ("params", "buffers")} for p in parts}


def caption_forward(model: K25Model, pixel_values: jnp.ndarray, ids: jnp.ndarray, pack_size: int) -> DecoderOutput:
    """The K2 decoder over [projected vision tokens, embedded ids]: `K25Model.__call__` with the media
    placeholders in front of the text (tested equal), but with MoonViT run in packs of `pack_size`."""
    media = encode_in_packs(model.encode_media, pixel_values, pack_size)  # (b, tokens, D_text)
    lm = model.language_model
    return lm(inputs_embeds=jnp.concatenate([media.astype(jnp.float32), lm.embed(ids).astype(jnp.float32)], 1))


def _config_error(field: str, e: Exception) -> ValueError:
    return ValueError(f"config.{field}: {e}")


class ViTStage:
    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.phase = config.phase
        if self.phase not in PHASES:
            raise ValueError(f"config.phase={self.phase!r} is unknown; choose one of {PHASES}.")
        self.tokenizer = load_tokenizer("byte")
        self.data = VisionTextData(config.data, self.tokenizer)
        try:
            vision = MoonViTConfig.from_dict(config.vision.to_dict())
        except ValueError as e:
            raise _config_error("vision", e) from None
        if self.phase == "coca":
            text = TextTowerConfig(**config.text_tower.to_dict(), vocab_size=self.tokenizer.vocab_size,
                                   max_len=config.data.text_len)
            self.coca_cfg = CoCaConfig(vision=vision, text=text, embed_dim=config.coca.embed_dim,
                                       init_log_temperature=config.coca.init_log_temperature,
                                       init_bias=config.coca.init_bias, pack_size=config.vision_pack_size).validate()
        else:
            try:
                lm = K2Config.from_dict(config.lm.to_dict())
            except ValueError as e:
                raise _config_error("lm", e) from None
            if lm.vocab_size < self.tokenizer.vocab_size:
                raise ValueError(f"config.lm.vocab_size={lm.vocab_size} is below the byte tokenizer's "
                                 f"{self.tokenizer.vocab_size}.")
            self.k25_cfg = K25Config(text_config=lm, vision_config=vision,
                                     projection_hidden_size=vision.hidden_size).validate()
        self.evaluator = Evaluator(self.data, "coca" if self.phase == "coca" else "k25", config.eval_pool,
                                   config.eval_examples, config.vision_pack_size)
        self.init_params = load_parts(config.get("init_from", ""), tuple(config.get("init_parts", ())))

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh model, with the `init_parts` of the `init_from` run copied in (as constants: fine at this
        scale; a sharded restore would be the path for large towers)."""
        model = CoCa(self.coca_cfg, rngs=rngs) if self.phase == "coca" else K25Model(self.k25_cfg, rngs=rngs)
        for part, saved in self.init_params.items():
            if not hasattr(model, part):
                raise ValueError(f"config.init_parts: the {self.phase} model has no {part!r}.")
            copy_into(getattr(model, part), saved, f"config.init_from ({part!r} in {self.config.init_from})")
        return model

    # ------------------------------------------------------------------------------------------- losses
    def loss_fn(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
        return self._coca_loss(model, batch) if self.phase == "coca" else self._caption_loss(model, batch)

    def _coca_loss(self, model: CoCa, batch: dict) -> tuple[jax.Array, dict]:
        tokens = model.vision_tokens(batch["pixel_values"])
        rows = siglip_loss(model.image_embedding(tokens), model.text_embedding(batch["text_ids"], batch["text_mask"]),
                           model.log_temperature[...], model.logit_bias[...])
        ids = batch["text_ids"]
        ce_sum, ce_count = caption_cross_entropy(model.caption_logits(tokens, ids), ids, batch["loss_mask"])
        caption = ce_sum / jnp.maximum(ce_count, 1.0)
        b = jnp.float32(ids.shape[0])
        total = jnp.sum(rows) + self.config.coca.caption_weight * b * caption
        return total, {"num_tokens": b, "siglip_loss": jnp.mean(rows), "caption_loss": caption,
                       "temperature": jnp.exp(model.log_temperature[...]), "siglip_bias": model.logit_bias[...]}

    def _caption_loss(self, model: K25Model, batch: dict) -> tuple[jax.Array, dict]:
        """Caption CE through the K2.5 path: MoonViT -> projector tokens first, then bos + prompt + answer."""
        out = caption_forward(model, batch["pixel_values"], batch["text_ids"], self.config.vision_pack_size)
        ids = batch["text_ids"]
        ce_sum, ce_count = caption_cross_entropy(out.logits[:, -ids.shape[1]:], ids, batch["loss_mask"])
        return ce_sum, {"num_tokens": ce_count, "max_attn_logits": out.max_attn_logits,
                        "expert_counts": out.expert_counts}

    # ---------------------------------------------------------------------------------------- runtime
    def step_config(self) -> StepConfig:
        c = self.config
        if self.phase == "caption_align":  # the K2 decoder trains: QK-Clip and expert balancing as in K2
            lm = self.k25_cfg.text_config
            return StepConfig(accum_steps=c.optim.accum_steps, qk_clip_tau=c.optim.qk_clip_tau,
                              bias_update_rate=lm.bias_update_rate, text_cfg=lm, text_path=("language_model",))
        # CoCa has no MLA; projector_only must leave the K2 decoder (weights and routing biases) untouched
        return StepConfig(accum_steps=c.optim.accum_steps, qk_clip_tau=0.0)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """An image batch (video batches differ only in t = 4)."""
        c, v = self.config, self.vision_config
        side = c.data.image_size // v.patch_size
        text = (batch_size, c.data.text_len)
        return {"pixel_values": jax.ShapeDtypeStruct((batch_size, 1, side, side, v.patch_dim), jnp.float32),
                **{k: jax.ShapeDtypeStruct(text, jnp.int32) for k in ("text_ids", "text_mask", "loss_mask")}}

    @property
    def vision_config(self) -> MoonViTConfig:
        return self.coca_cfg.vision if self.phase == "coca" else self.k25_cfg.vision_config

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        return make_vision_iterator(self.data, seed=seed, batch_size=self.config.batch_size,
                                    process_index=process_index, process_count=process_count)

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        """eval/retrieval_r1 over `eval_pool` distinct held-out texts, eval/caption_exact (mean over tasks)
        and eval/<task>_exact over `eval_examples` held-out samples per task."""
        return self.evaluator(model)
