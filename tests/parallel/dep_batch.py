"""A tiny K2.5 and a raw multimodal batch with uneven images and a video, shared by the DEP tests."""

from __future__ import annotations

import numpy as np
from flax import nnx

from k25.model.config import tiny
from k25.model.k25 import K25Model
from k25.model.vision_config import K25Config, tiny_vision
from k25.train.state import split_model

IMG, VID = 250, 251
# images of many sizes (down-, up- and same-size position tables) and a 6-frame video cut into 4 + 2 frames
IMAGE_GRIDS = ((1, 4, 6), (1, 10, 8), (1, 2, 2), (1, 8, 8), (1, 12, 4), (1, 6, 6), (1, 2, 4))
VIDEO_GRIDS = ((4, 4, 4), (2, 4, 4))


def tiny_k25() -> K25Config:
    text = tiny(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    return K25Config(text_config=text, vision_config=tiny_vision(), projection_hidden_size=32,
                     image_token_id=IMG, video_token_id=VID).validate()


def tiny_model(cfg: K25Config, seed: int = 0):
    """(ModelDef, params, buffers) with a non-zero routing bias, so the buffers matter."""
    model = K25Model(cfg, rngs=nnx.Rngs(seed))
    model_def, params, buffers = split_model(model)
    return model_def, params, _perturb(buffers, np.random.default_rng(seed))


def _perturb(tree, rng):
    if isinstance(tree, dict):
        return {k: _perturb(v, rng) for k, v in tree.items()}
    return tree + 0.05 * rng.standard_normal(np.shape(tree)).astype(np.float32)


def raw_batch(cfg: K25Config, batch: int = 8, seq: int = 32, seed: int = 0,
              image_grids=IMAGE_GRIDS, video_grids=VIDEO_GRIDS) -> dict:
    """Rows of random text with every chunk's placeholders laid out in chunk order (row-major).

    Chunks go to rows in order, a row taking the next chunk while it fits in 3/4 of the row, so rows hold
    different numbers and sizes of images (and some none).
    """
    rng = np.random.default_rng(seed)
    merge = cfg.vision_config.merge_area
    media = [(IMG, h * w // merge) for _, h, w in image_grids] + [(VID, h * w // merge) for _, h, w in video_grids]
    rows: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    r = 0
    for tok, n in media:
        while sum(m for _, m in rows[r]) + n > 3 * seq // 4:
            r += 1
            if r == batch:
                raise ValueError("media do not fit: raise seq or batch")
        rows[r].append((tok, n))
    vocab = cfg.text_config.vocab_size
    ids = rng.integers(0, IMG, (batch, seq)).astype(np.int32)  # text ids avoid the placeholder ids
    for i, row in enumerate(rows):
        pos = 1
        for tok, n in row:
            ids[i, pos:pos + n] = tok
            pos += n + 1
    is_media = (ids == IMG) | (ids == VID)
    patch_dim = cfg.vision_config.patch_dim
    out = {
        "input_ids": ids,
        "targets": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
        "loss_mask": (~is_media).astype(np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
    }
    if image_grids:
        n = sum(t * h * w for t, h, w in image_grids)
        out["pixel_values"] = rng.standard_normal((n, patch_dim)).astype(np.float32)
        out["image_grid_thw"] = np.asarray(image_grids, np.int64)
    if video_grids:
        n = sum(t * h * w for t, h, w in video_grids)
        out["pixel_values_videos"] = rng.standard_normal((n, patch_dim)).astype(np.float32)
        out["video_grid_thw"] = np.asarray(video_grids, np.int64)
    return out
