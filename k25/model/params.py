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
