"""K2.5 prefill through the model's own embedding path: images and a video chunk spliced in, then cached decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25.infer import Request, Sampler
from k25.model.config import tiny
from k25.model.k25 import K25Model
from k25.model.vision_config import K25Config, tiny_vision

IMG, VID = 250, 251
IMAGE_GRIDS = ((1, 4, 6), (1, 2, 2))  # 6 + 1 tokens
VIDEO_GRID = ((2, 4, 4),)  # one 2-frame chunk: 4 tokens


@pytest.mark.slow
def test_multimodal_prefill_matches_k25_forward():
    text = tiny(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, initializer_range=0.1)
    cfg = K25Config(text_config=text, vision_config=tiny_vision(), projection_hidden_size=32, image_token_id=IMG,
                    video_token_id=VID).validate()
    model = K25Model(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    patch = cfg.vision_config.patch_dim
    px = rng.normal(size=(sum(t * h * w for t, h, w in IMAGE_GRIDS), patch)).astype(np.float32)
    pxv = rng.normal(size=(sum(t * h * w for t, h, w in VIDEO_GRID), patch)).astype(np.float32)
    prompt = [5, 6] + [IMG] * 6 + [7] + [IMG] + [8, 9] + [VID] * 4 + [10]
    media = dict(pixel_values=px, grid_thw=np.asarray(IMAGE_GRIDS), pixel_values_videos=pxv,
                 video_grid_thw=np.asarray(VIDEO_GRID))
    sampler = Sampler(model, max_slots=2, max_len=48, cache_dtype=jnp.float32)
    reqs = [Request(prompt, max_new_tokens=8, temperature=0.0, **media),
            Request([11, 12, 13], max_new_tokens=5, temperature=1.0, seed=3)]  # text only, in the same batch
    out = sampler.generate(reqs)
    for r, c in zip(reqs, out):
        ids = np.asarray([c.prompt_ids + c.token_ids], np.int32)
        kw = {} if r.pixel_values is None else dict(pixel_values=px, image_grid_thw=IMAGE_GRIDS,
                                                    pixel_values_videos=pxv, video_grid_thw=VIDEO_GRID)
        logp = np.asarray(jax.nn.log_softmax(model(ids, **kw).logits[0]))
        n = len(c.prompt_ids)
        pos = np.arange(n - 1, ids.shape[1] - 1)
        np.testing.assert_allclose(c.logprobs, logp[pos, c.token_ids], atol=1e-4, rtol=0)
        if r.temperature == 0:
            assert c.token_ids == np.argmax(logp[pos], -1).tolist()
    try:
        sampler.generate([Request(prompt[:-5] + [10], max_new_tokens=2, **media)])
    except ValueError as e:
        assert "placeholder" in str(e)
    else:
        raise AssertionError("a prompt missing its video placeholders must be rejected")
