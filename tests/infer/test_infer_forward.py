"""Prefill + absorbed decode through the compressed cache equal the training forward's logits (float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25.infer.cache import init_cache, kv_bytes_per_token
from k25.infer.forward import decode, prefill
from k25.model.config import RopeScaling, k2_full, tiny
from k25.model.decoder import K2Model

SEQ = 40  # past original_max_position_embeddings=16: YaRN's interpolated frequencies are exercised
PROMPTS = (7, 12)  # two slots, prompts of different lengths, decoded together
TOL = 1e-4


def model_for(q_lora: int) -> K2Model:
    cfg = tiny(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=3, q_lora_rank=q_lora, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6,
               v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
               initializer_range=0.15, moe_block_size=8,
               rope_scaling=RopeScaling(type="yarn", factor=8.0, original_max_position_embeddings=16,
                                        mscale=1.0, mscale_all_dim=1.0))
    model = K2Model(cfg, rngs=nnx.Rngs(q_lora))
    bias = model.moe_layers.mlp.bias
    bias[...] = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, bias.shape), jnp.float32)
    return model


@pytest.mark.parametrize("q_lora", [24, 0])
def test_prefill_then_decode_equals_full_forward(q_lora):
    model = model_for(q_lora)
    cfg = model.cfg
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(PROMPTS), SEQ)).astype(np.int32)
    full = np.asarray(jax.jit(lambda m, x: m(x).logits)(model, ids))

    graphdef, state = nnx.split(model)
    cache = init_cache(cfg, slots=len(PROMPTS), max_len=64, dtype=jnp.float32)

    @jax.jit
    def prefill_fn(state, cache, x, length, slot):
        m = nnx.merge(graphdef, state)
        return prefill(m, m.embed(x), length, slot, cache)

    @functools.partial(jax.jit, static_argnames="window")
    def decode_fn(state, cache, tokens, positions, window):
        return decode(nnx.merge(graphdef, state), tokens, positions, cache, window)

    for slot, n in enumerate(PROMPTS):
        padded = np.zeros((1, 16), np.int32)
        padded[0, :n] = ids[slot, :n]
        logits, cache = prefill_fn(state, cache, padded, n, slot)
        np.testing.assert_allclose(logits[0], full[slot, n - 1], atol=TOL, rtol=0)
    pos = np.array(PROMPTS, np.int32)
    while pos.min() < SEQ:  # the longer row repeats its last position (same token, same cache entry), unchecked
        p = np.minimum(pos, SEQ - 1)
        window = 16 if p.max() < 16 else 64
        logits, cache = decode_fn(state, cache, ids[np.arange(len(PROMPTS)), p], p, window)
        for i in range(len(PROMPTS)):
            if pos[i] < SEQ:
                np.testing.assert_allclose(logits[i], full[i, pos[i]], atol=TOL, rtol=0, err_msg=f"row {i} pos {pos[i]}")
        pos += 1


def test_k2_full_cache_bytes():
    b = kv_bytes_per_token(k2_full(), jnp.bfloat16)
    assert b["compressed"] == 61 * (512 + 64) * 2
    assert b["per_head"] == 61 * 64 * (192 + 128) * 2
