"""The MLA compressed KV cache: per layer, per slot, per position one normed latent and one rope key.

What is cached (DeepSeek-V3's `absorb` inference): the kv latent *after* `kv_a_layernorm` (c = kv_lora_rank
values) and the shared rope key *after* its rotation (dr = qk_rope_head_dim values). Caching post-norm,
post-rotation values means a decode step never recomputes either for past tokens: the absorbed query dots
the cached latent directly and the rotated query dots the cached rope key (k25/infer/attention.py). The
cost per token is L * (c + dr) values, against L * H * (dn + dr + dv) for per-head K/V (`kv_bytes_per_token`).

Layout: one `{"latent": (L, S, T, c), "k_rope": (L, S, T, dr)}` dict per layer stack of `K2Model`
(`dense_layers`, `moe_layers`), S slots, T = max_len positions, in `cache_dtype`. Positions past a slot's
length hold stale values from an earlier request; attention masks them, so slots are reused without clearing.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from k25.model.config import K2Config

STACKS = ("dense_layers", "moe_layers")


def stack_depths(cfg: K2Config) -> dict[str, int]:
    """Layers in each non-empty stack of `K2Model`, in the order the model runs them."""
    depths = {"dense_layers": cfg.first_k_dense_replace, "moe_layers": cfg.num_moe_layers}
    return {k: v for k, v in depths.items() if v > 0}


def init_cache(cfg: K2Config, slots: int, max_len: int, dtype=jnp.bfloat16) -> dict[str, dict[str, jnp.ndarray]]:
    """Zeroed cache for `slots` sequences of up to `max_len` tokens."""
    return {name: {"latent": jnp.zeros((n, slots, max_len, cfg.kv_lora_rank), dtype),
                   "k_rope": jnp.zeros((n, slots, max_len, cfg.qk_rope_head_dim), dtype)}
            for name, n in stack_depths(cfg).items()}


def kv_bytes_per_token(cfg: K2Config, dtype=jnp.bfloat16) -> dict[str, int]:
    """Cache bytes one token costs: `compressed` (this cache) and `per_head` (K and V of every head kept).

    compressed = L * (kv_lora_rank + qk_rope_head_dim) * bytes; per_head = L * H * (qk_head_dim + v_head_dim)
    * bytes (the rope part of the key is per head once keys are materialised per head).
    """
    b = np.dtype(dtype).itemsize
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    return {"compressed": L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b,
            "per_head": L * H * (cfg.qk_head_dim + cfg.v_head_dim) * b}
