"""MLA attention against the compressed cache: prefill (naive, the training attention) and absorbed decode.

Prefill runs the training forward's own `attention` on the prompt (keys and values decompressed from the
latent, exactly as in training) and writes the latent and rope key of each prompt token into the cache.

Decode absorbs the up-projections, as DeepSeek-V3's reference inference does in its "absorb" mode. With the
kv_b kernel split per head h into W_uk[h] (c, dn) and W_uv[h] (c, dv), c_t the cached normed latent and
r_t the cached rotated rope key of past token t:

    score[h, t] = scale * (q_nope[h] . (c_t W_uk[h]) + q_rope[h] . r_t)
                = scale * ((W_uk[h] q_nope[h]) . c_t + q_rope[h] . r_t)          # q_lat[h] = W_uk[h] q_nope[h]
    out[h]      = sum_t p[h, t] (c_t W_uv[h]) = (sum_t p[h, t] c_t) W_uv[h]        # o_lat[h] W_uv[h]

so a step touches c + dr cached values per past token and head instead of dn + dr + dv, and never
materialises per-head keys or values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k25.model.mla import MLA, NEG_INF, attention


def prefill_attention(attn: MLA, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray
                      ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """x (b, s, d) -> (attention output (b, s, d), latent (b, s, c), rope key (b, s, dr)) for the cache."""
    b, s, _ = x.shape
    q_nope, q_rope = attn.queries(x, cos, sin)
    latent, k_rope = attn.latent(x, cos, sin)
    k_nope, v = attn.expand(latent)
    out, _ = attention(q_nope, q_rope, k_nope, k_rope[:, :, None, :], v, mask, attn.scale, attn.cfg.attention_chunk)
    return attn.o_proj(out.reshape(b, s, -1)), latent, k_rope


def absorbed_kernels(attn: MLA) -> tuple[jnp.ndarray, jnp.ndarray]:
    """kv_b_proj split per head: (W_uk (c, h, dn), W_uv (c, h, dv)) in the compute dtype."""
    cfg = attn.cfg
    w = attn.kv_b_proj.kernel[...].astype(cfg.compute_dtype)
    w = w.reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]


def decode_attention(attn: MLA, q_nope: jnp.ndarray, q_rope: jnp.ndarray, latent: jnp.ndarray,
                     k_rope: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """One query per slot against its cached tokens, absorbed.

    q_nope (S, h, dn), q_rope (S, h, dr) rotated; latent (S, W, c) and k_rope (S, W, dr) the cache window
    (the current token already written); valid (S, W) bool -> attention output (S, d).
    """
    cfg = attn.cfg
    cd = cfg.compute_dtype
    f32 = jnp.float32
    w_uk, w_uv = absorbed_kernels(attn)
    latent, k_rope = latent.astype(cd), k_rope.astype(cd)
    q_lat = jnp.einsum("shd,chd->shc", q_nope.astype(cd), w_uk)
    scores = (jnp.einsum("shc,stc->sht", q_lat, latent, preferred_element_type=f32)
              + jnp.einsum("shr,str->sht", q_rope.astype(cd), k_rope, preferred_element_type=f32))
    probs = jax.nn.softmax(jnp.where(valid[:, None, :], scores * attn.scale, NEG_INF), axis=-1)
    o_lat = jnp.einsum("sht,stc->shc", probs.astype(cd), latent)
    out = jnp.einsum("shc,chv->shv", o_lat, w_uv)
    return attn.o_proj(out.reshape(out.shape[0], -1))
