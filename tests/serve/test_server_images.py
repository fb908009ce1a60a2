"""Image chat through the server: an `image_url` data URI reaches a K25Model as pixel values (slow: MoonViT)."""

from __future__ import annotations

import base64
import io

import jax.numpy as jnp
import numpy as np
import openai
import pytest
from chat_fixtures import Server, random_model
from PIL import Image

from k25.data import chat
from k25.data.preprocess import preprocess_images
from k25.infer import Request, Sampler
from k25.model.config import tiny
from k25.model.k25 import K25Model
from k25.model.vision_config import K25Config, tiny_vision
from k25.serve.app import create_app
from k25.serve.engine import Engine


@pytest.mark.slow
def test_image_data_uri_reaches_the_vision_tower():
    fmt = chat.byte_chat_format()
    text = tiny(vocab_size=288, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    cfg = K25Config(text_config=text, vision_config=tiny_vision(), projection_hidden_size=32,
                    image_token_id=fmt.image_pad_id, video_token_id=fmt.video_pad_id).validate()
    sampler = Sampler(random_model(cfg, K25Model), max_slots=2, max_len=128, cache_dtype=jnp.float32,
                      min_bucket=128)
    image = (np.arange(56 * 84 * 3) % 251).astype(np.uint8).reshape(56, 84, 3)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    server = Server(create_app(Engine(sampler, fmt, model_name="k25-tiny")))
    try:
        client = openai.OpenAI(base_url=server.url, api_key="x", timeout=300, max_retries=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                 {"type": "text", "text": "What?"}]}]
        resp = client.chat.completions.create(model="k25-tiny", messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"return_token_ids": True})
    finally:
        server.stop()
    px = preprocess_images([image], patch_size=cfg.vision_config.patch_size, merge_size=2)
    (t, h, w), = [tuple(int(v) for v in g) for g in px["image_grid_thw"]]
    prompt = resp.model_extra["prompt_token_ids"]
    assert prompt.count(fmt.image_pad_id) == t * h * w // 4 > 1
    assert fmt.decode(prompt).count("<|media_begin|>image<|media_content|>") == 1
    (ref,) = sampler.generate([Request(prompt, 4, temperature=0.0, stop_ids=fmt.stop_ids,
                                       pixel_values=px["pixel_values"], grid_thw=px["image_grid_thw"])])
    assert resp.choices[0].model_extra["token_ids"] == ref.token_ids
