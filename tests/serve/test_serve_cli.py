"""`python -m experiments.serve` on checkpoint directories: loading, and the command end to end (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from chat_fixtures import free_port, random_model, write_synthetic_kimi_tokenizer

import k25.hf
from k25.data.chat import IM_END
from k25.infer.client import OpenAIClient
from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.serve.load import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf_dir(path: str) -> str:
    """A random tiny K2 saved as an HF checkpoint, with Kimi tokenizer files laid out as released."""
    os.makedirs(path, exist_ok=True)
    n = write_synthetic_kimi_tokenizer(path)
    cfg = tiny(vocab_size=n + 256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    k25.hf.save(random_model(cfg), path)
    return path


def test_load_checkpoint_rejects_what_it_cannot_serve(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither a k25 run directory"):
        load_checkpoint(str(tmp_path))


def test_load_hf_directory_gives_model_and_released_format(tmp_path):
    model, fmt = load_checkpoint(hf_dir(str(tmp_path)))
    assert isinstance(model, K2Model)
    n = model.cfg.vocab_size - 256
    assert fmt.special_ids[IM_END] == n + 2 and fmt.image_pad_id == n + 21
    fmt.check_vocab(model.cfg.vocab_size)


@pytest.mark.slow
def test_serve_command_answers_an_openai_client(tmp_path):
    path = hf_dir(str(tmp_path / "ckpt"))
    port = free_port()
    cmd = [sys.executable, "-m", "experiments.serve", f"--checkpoint={path}", f"--port={port}", "--api_key=k",
           "--max_slots=2", "--max_len=64", "--cache_dtype=float32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "server did not come up in 150 s"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}, timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert r.json()["data"][0]["id"] == "ckpt"
        import asyncio

        res = asyncio.run(OpenAIClient("ckpt", base_url=f"http://127.0.0.1:{port}/v1", api_key="k").chat(
            [{"role": "user", "content": "the"}], max_tokens=4, temperature=0))
        assert res.prompt_ids[:1] == [262 + 3] and 1 <= len(res.token_ids) <= 4  # <|im_user|> at its released slot
    finally:
        proc.terminate()
        proc.wait(30)


def _run_dir(path: str, vocab: int):
    """A run directory as the training loop leaves it (config.json + an orbax checkpoint), weights drawn at
    random from the Trainer's abstract state instead of trained (no compile)."""
    import jax
    import numpy as np
    from lm_configs import small_lm_config

    from k25.train.checkpoint import Checkpointer, config_json
    from k25.train.loop import Trainer

    config = small_lm_config(layers=2, batch=2, seq_len=16)
    config.model.vocab_size = vocab
    config.mesh.devices = 1
    trainer = Trainer(config, path)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jax.device_put(np.asarray(rng.normal(0, 0.05, x.shape), x.dtype), x.sharding),
                         trainer.abstract_state)
    ckpt = Checkpointer(path, async_save=False)
    ckpt.save(3, state, {}, {"step": 3}, force=True)
    ckpt.wait()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_json(config))
    return path, state


def test_run_directory_loads_and_too_small_vocab_is_named(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    from k25.infer import Sampler
    from k25.serve.engine import Engine

    path, saved = _run_dir(str(tmp_path / "run"), 288)
    model, fmt = load_checkpoint(path)
    assert isinstance(model, K2Model) and model.cfg.num_hidden_layers == 2
    engine = Engine(Sampler(model, max_slots=1, max_len=64, cache_dtype=jnp.float32), fmt, model_name="run")
    assert engine.chat_prompt([{"role": "user", "content": "hi"}], None, None, None).ids == fmt.encode(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True).ids
    np.testing.assert_array_equal(model.embed_tokens.embedding[...], saved.params["embed_tokens"]["embedding"])
    small, fmt = load_checkpoint(_run_dir(str(tmp_path / "run272"), 272)[0])  # tiny_lm's vocab: no room to chat
    with pytest.raises(ValueError, match="vocab_size >= 278"):
        Engine(Sampler(small, max_slots=1, max_len=64), fmt, model_name="x")


def test_a_k25_checkpoint_is_served_without_sampling_its_media_placeholders(tmp_path):
    """`load_sampler` (the serve command's sampler): a K2.5 directory's sampler suppresses the image placeholder;
    the video placeholder sits past the text vocabulary, as released, so it cannot be sampled anyway; a K2
    directory suppresses nothing, and neither does the evaluations' sampler (suppress_placeholders=False)."""
    from chat_fixtures import random_model

    from k25.data.chat import load_chat_format
    from k25.model.k25 import K25Model
    from k25.model.vision_config import K25Config, tiny_vision
    from k25.serve.load import load_sampler

    path = str(tmp_path / "k25")
    os.makedirs(path)
    n = write_synthetic_kimi_tokenizer(path)
    fmt = load_chat_format(path)
    text = tiny(vocab_size=n + 256, hidden_size=64, num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2,
                n_group=1, topk_group=1, dtype="float32")
    vision = tiny_vision()
    cfg = K25Config(text_config=text, vision_config=vision, projection_hidden_size=vision.hidden_size,
                    image_token_id=fmt.image_pad_id, video_token_id=text.vocab_size).validate()
    k25.hf.save(random_model(cfg, K25Model), path)
    sampler, chat = load_sampler(path, max_slots=1, max_len=32)
    assert sampler.suppress_ids == cfg.sampled_placeholder_ids == (fmt.image_pad_id,)
    assert chat.image_pad_id == fmt.image_pad_id
    assert load_sampler(path, max_slots=1, max_len=32, suppress_placeholders=False)[0].suppress_ids == ()
    sampler, _ = load_sampler(hf_dir(str(tmp_path / "k2")), max_slots=1, max_len=32)
    assert sampler.suppress_ids == ()
