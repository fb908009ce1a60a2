"""K2.5: MoonViT-3D + projector + the K2 decoder.

All images and video chunks of a call are encoded in one packed vision pass; their projected tokens then
replace the placeholder ids of `input_ids` in order (images fill `image_token_id` slots, video chunks
fill `video_token_id` slots, row-major over the batch), as transformers' masked_scatter does. A video
chunk yields one frame's worth of tokens (h*w/(kh*kw)) whatever its length, so a last chunk shorter than
pos_emb_time frames needs no special casing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.decoder import DecoderOutput, K2Model
from k25.model.moonvit import MoonViT, normalize_grid, tokens_per_chunk
from k25.model.projector import Projector
from k25.model.vision_config import K25Config


def scatter_placeholders(embeds: jnp.ndarray, input_ids: jnp.ndarray, token_id: int, features: jnp.ndarray
                         ) -> jnp.ndarray:
    """Replace the embeddings at `token_id` positions (row-major) by `features` rows, in order."""
    b, s, d = embeds.shape
    mask = (input_ids == token_id).reshape(-1)
    order = jnp.clip(jnp.cumsum(mask) - 1, 0, max(features.shape[0] - 1, 0))
    picked = features.astype(embeds.dtype)[order]
    return jnp.where(mask[:, None], picked, embeds.reshape(-1, d)).reshape(b, s, d)


def check_placeholders(input_ids: jnp.ndarray, token_id: int, expected: int) -> None:
    """With concrete ids, fail before any vision compute if the prompt's placeholders do not fit the media."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    found = int((input_ids == token_id).sum())
    if found != expected:
        raise ValueError(f"input_ids holds {found} placeholder(s) of id {token_id} but the media give {expected} "
                         "token(s); the prompt must have one placeholder per media token (h*w/merge^2 per image "
                         "or video chunk).")


class K25Model(nnx.Module):
    def __init__(self, cfg: K25Config, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.vision_tower = MoonViT(cfg.vision_config, rngs=rngs)
        self.mm_projector = Projector(cfg, rngs=rngs)
        self.language_model = K2Model(cfg.text_config, rngs=rngs)

    def encode_media(self, pixel_values: jnp.ndarray, grid_thw: Any) -> jnp.ndarray:
        """(N, C, p, p) patches of packed chunks -> (tokens, D_text) projected LLM tokens, chunk by chunk."""
        return self.mm_projector(self.vision_tower(pixel_values, grid_thw).pooled)

    def embed(self, input_ids: jnp.ndarray, pixel_values: jnp.ndarray | None = None, image_grid_thw: Any = None,
              pixel_values_videos: jnp.ndarray | None = None, video_grid_thw: Any = None) -> jnp.ndarray:
        """Token embeddings with every media placeholder replaced by its vision token: (b, s, D_text)."""
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        is_media = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
        embeds = self.language_model.embed(jnp.where(is_media, 0, input_ids))  # placeholder ids may be >= vocab
        media = [(pixel_values, normalize_grid(image_grid_thw), cfg.image_token_id),
                 (pixel_values_videos, normalize_grid(video_grid_thw), cfg.video_token_id)]
        media = [(px, grid, tok) for px, grid, tok in media if px is not None]
        if not media:
            return embeds
        counts = []
        for _, grid, tok in media:
            if not grid:
                raise ValueError("pixel values were given without their grid_thw; pass image_grid_thw / "
                                 "video_grid_thw from the processor.")
            counts.append(sum(tokens_per_chunk(grid, cfg.vision_config.merge_kernel_size)))
            check_placeholders(input_ids, tok, counts[-1])
        patch_dim = cfg.vision_config.patch_dim
        pixels = jnp.concatenate([jnp.asarray(px).reshape(-1, patch_dim) for px, _, _ in media])
        feats = self.encode_media(pixels, sum((grid for _, grid, _ in media), ()))
        start = 0
        for (_, _, tok), n in zip(media, counts):
            embeds = scatter_placeholders(embeds, input_ids, tok, feats[start:start + n])
            start += n
        return embeds

    def __call__(self, input_ids: jnp.ndarray, pixel_values: jnp.ndarray | None = None,
                 image_grid_thw: Any = None, pixel_values_videos: jnp.ndarray | None = None,
                 video_grid_thw: Any = None, *, positions: jnp.ndarray | None = None,
                 segment_ids: jnp.ndarray | None = None) -> DecoderOutput:
        """input_ids (b, s); media in the HF processor layout; grids are host data (static under jit)."""
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return self.language_model(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids)
