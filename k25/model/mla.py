"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2).

Queries go through an optional low-rank bottleneck (q_lora_rank > 0) with RMSNorm; keys and
values are decompressed from one kv_lora_rank latent (RMSNorm'd) and a single rope key that
all heads share. The forward also returns the maximum pre-softmax logit of each head, which
QK-Clip needs; it is one extra reduction over the logits already computed.

Query column layout (per head h, width qk_head_dim): [q_nope (qk_nope_head_dim) | q_rope].
kv_b column layout (per head h, width qk_nope+v): [k_nope | v]. QK-Clip relies on these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.config import K2Config
from k25.model.layers import Linear, RMSNorm
from k25.model.remat import MLA_UP, tag
from k25.model.rope import apply_rope, softmax_scale

NEG_INF = -1e30


def attention_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """(batch, 1, q, k) bool: causal within a row and only inside the same document (segment id)."""
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


class MLA(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H = cfg.num_attention_heads
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, std=cfg.initializer_range, rngs=rngs)
        nkw = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        if cfg.q_lora_rank > 0:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, ("embed", "q_lora"), **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, **nkw)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, ("q_lora", "heads_q"), **kw)
        else:
            self.q_proj = Linear(cfg.hidden_size, H * cfg.qk_head_dim, ("embed", "heads_q"), **kw)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                         ("embed", "kv_lora"), **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, **nkw)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads_q"), **kw)
        self.o_proj = Linear(H * cfg.v_head_dim, cfg.hidden_size, ("heads_q", "embed"), **kw)
        self.scale = softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)

    def query(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.cfg.q_lora_rank > 0:
            return tag(self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))), MLA_UP)
        return self.q_proj(x)

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (b, s, d); cos/sin (b, s, rope/2); mask (b, 1, s, s) -> (out (b, s, d), max_logit (heads,))."""
        cfg = self.cfg
        b, s, _ = x.shape
        H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.query(x).reshape(b, s, H, dn + dr)
        q_nope, q_rope = q[..., :dn], q[..., dn:]
        ckv = self.kv_a_proj_with_mqa(x)
        kv_latent, k_rope = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
        kv = tag(self.kv_b_proj(self.kv_a_layernorm(kv_latent)), MLA_UP).reshape(b, s, H, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)  # (b, s, 1, dr): shared by all heads

        logits = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope[:, :, 0], preferred_element_type=jnp.float32))
        logits = logits * self.scale
        masked = jnp.where(mask, logits, NEG_INF)
        max_logit = jax.lax.stop_gradient(jnp.max(masked, axis=(0, 2, 3)))
        probs = jax.nn.softmax(masked, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, H * dv)
        return self.o_proj(out), max_logit
