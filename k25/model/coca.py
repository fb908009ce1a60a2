"""CoCa around MoonViT-3D (report §4.3 "ViT Training Stage"): a contrastive pair of towers (MoonViT pooled
embedding vs. a small text encoder) with SigLIP's learnable temperature and bias, plus a captioning
decoder that cross-attends to MoonViT's output tokens.

The vision tokens are MoonViT's own output: each chunk averaged over time and grouped 2x2
(`VisionOutput.pooled`), so an image and a 4-frame video of the same size give the same number of tokens,
exactly what the K2.5 projector would receive. Batches hold one grid for all examples, passed as the shape
of `pixel_values` (b, t, h, w, C*p*p); the packed MoonViT input and its `grid_thw` are derived from it.

`pack_size` examples are packed into one MoonViT sequence and the packs are vmapped. Attention is
block-diagonal per chunk either way, so the result does not depend on it; what changes is the cost of
MoonViT's dense masked attention, quadratic in the packed length (a whole batch of 64 four-frame videos
would be one 4096-patch sequence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.moonvit import DenseBias, LayerNorm, MoonViT
from k25.model.text_tower import TextDecoder, TextEncoder, TextTowerConfig
from k25.model.vision_config import MoonViTConfig


@dataclasses.dataclass(frozen=True)
class CoCaConfig:
    vision: MoonViTConfig = dataclasses.field(default_factory=MoonViTConfig)
    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)
    embed_dim: int = 64  # shared contrastive embedding width
    init_log_temperature: float = math.log(10.0)  # SigLIP: t' = log 10, t = exp(t')
    init_bias: float = -10.0  # SigLIP: b = -10 offsets the n-1 negatives per positive at the start
    pack_size: int = 8  # examples per packed MoonViT sequence (0: the whole batch); see encode_in_packs

    def validate(self) -> CoCaConfig:
        self.vision.validate()
        self.text.validate()
        if self.embed_dim <= 0:
            raise ValueError(f"CoCaConfig: embed_dim={self.embed_dim} must be positive.")
        return self


Grid = tuple[tuple[int, int, int], ...]


def packed_vision_input(pixel_values: jnp.ndarray) -> tuple[jnp.ndarray, Grid]:
    """(b, t, h, w, P) same-grid examples -> MoonViT's packed (b*t*h*w, P) patches and static grid_thw."""
    b, t, h, w, p = pixel_values.shape
    return pixel_values.reshape(b * t * h * w, p), ((t, h, w),) * b


def encode_in_packs(encode: Callable[[jnp.ndarray, Grid], jnp.ndarray], pixel_values: jnp.ndarray,
                    pack_size: int) -> jnp.ndarray:
    """`encode(packed, grid_thw) -> (tokens, ...)` over packs of `pack_size` same-grid examples (vmapped),
    returned per example: (b, tokens per example, ...). `pack_size` must divide the batch (else: one pack)."""
    b = pixel_values.shape[0]
    g = pack_size if 0 < pack_size <= b and b % pack_size == 0 else b
    packs = pixel_values.reshape(b // g, g, *pixel_values.shape[1:])
    grid = packed_vision_input(packs[0])[1]
    out = jax.vmap(lambda px: encode(packed_vision_input(px)[0], grid))(packs)
    return out.reshape(b, -1, *out.shape[2:])


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class CoCa(nnx.Module):
    def __init__(self, cfg: CoCaConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        v = cfg.vision
        self.vision_tower = MoonViT(v, rngs=rngs)
        self.image_norm = LayerNorm(v.hidden_size, eps=v.layer_norm_eps, dtype=v.compute_dtype,
                                    param_dtype=v.weight_dtype, rngs=rngs)
        self.image_head = DenseBias(v.hidden_size, cfg.embed_dim, ("vit_embed", None), dtype=v.compute_dtype,
                                    param_dtype=v.weight_dtype, std=v.initializer_range, rngs=rngs)
        self.text_encoder = TextEncoder(cfg.text, cfg.embed_dim, rngs=rngs)
        self.text_decoder = TextDecoder(cfg.text, v.hidden_size, rngs=rngs)
        self.log_temperature = nnx.Param(jnp.asarray(cfg.init_log_temperature, jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(cfg.init_bias, jnp.float32))

    def vision_tokens(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        """(b, t, h, w, P) -> (b, h*w, D): each example's time-averaged patches, 2x2 groups in raster order."""
        pooled = encode_in_packs(lambda px, grid: self.vision_tower(px, grid).pooled, pixel_values,
                                 self.cfg.pack_size)  # (b, h*w/4, 4, D)
        return pooled.reshape(pooled.shape[0], -1, pooled.shape[-1])

    def image_embedding(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Mean of the vision tokens -> LayerNorm -> linear, L2-normalised: (b, embed_dim)."""
        return l2_normalize(self.image_head(self.image_norm(jnp.mean(tokens, axis=1))))

    def text_embedding(self, text_ids: jnp.ndarray, text_mask: jnp.ndarray) -> jnp.ndarray:
        return l2_normalize(self.text_encoder(text_ids, text_mask))

    def caption_logits(self, tokens: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        return self.text_decoder(ids, tokens)
