"""Parameter counts from a config, through `jax.eval_shape` (nothing is allocated)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from k25.model.config import K2Config


def count_params(cfg: K2Config) -> dict[str, int]:
    """Total and per-token activated parameters of a K2 model.

    Activated = total minus the routed experts a token does not visit:
    (n_routed_experts - num_experts_per_tok) experts in every MoE layer. Embeddings, the LM head,
    attention, dense layers, routers and shared experts all count as activated (the report's convention).
    The routing correction bias is a buffer, not a parameter, and is not counted.
    """
    from k25.model.decoder import K2Model

    abstract = nnx.eval_shape(lambda: K2Model(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert * cfg.num_moe_layers
    return {"total_params": int(total), "active_params": int(total - idle)}


def model_flops_per_token(cfg: K2Config, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token of a K2 model at context `seq_len`, PaLM-style.

        6 * (active_params - embedding_lookup_params) + 6 * L * H * (qk_head_dim + v_head_dim) * seq_len

    * Weights: 2 FLOPs per weight per token forward (one multiply-add) and 4 backward (input and weight
      gradients) = 6 per activated weight, with `active_params` from `count_params` (routed experts a token
      does not visit excluded). The input embedding table is a gather, not a matmul, so its
      vocab_size * hidden_size weights are left out unless `tie_word_embeddings` (then the table is the LM head's
      matmul and counts once). Norm scales and the router are counted like matmul weights (a negligible error).
    * Attention (the weight-free matmuls): per layer and token, Q K^T costs 2 * H * qk_head_dim * seq_len and
      P V 2 * H * v_head_dim * seq_len forward, times 3 for forward + backward. The full seq_len x seq_len
      score matrix is counted (no causal halving), which is what `K2Attention` computes. Per sequence this is
      12 * L * H * (qk_head_dim + v_head_dim) / 2 * seq_len**2 (PaLM's 12 * L * H * Q * T with Q the mean of
      the query/key and value head widths). Softmax, norms, RoPE and other elementwise work are not counted.
    """
    active = count_params(cfg)["active_params"]
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return int(6 * (active - lookup) + attn)
