"""The K2.5 multimodal projector (transformers' `Kimi_K25MultimodalProjection`).

Each LLM token is kh*kw time-averaged vision patches. The LayerNorm runs per patch (over the vision
width), *then* the patches are concatenated: LN -> concat -> Linear -> GELU (exact erf) -> Linear.
Logical axes: vit_merged (kh*kw*D_vision), proj_mlp (projector hidden), embed (text width), norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.moonvit import DenseBias, LayerNorm
from k25.model.vision_config import K25Config


class Projector(nnx.Module):
    def __init__(self, cfg: K25Config, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        merged = v.hidden_size * v.merge_area
        kw = {"dtype": v.compute_dtype, "param_dtype": v.weight_dtype, "std": v.initializer_range, "rngs": rngs}
        self.pre_norm = LayerNorm(cfg.projection_hidden_size, eps=cfg.projection_layer_norm_eps,
                                  dtype=v.compute_dtype, param_dtype=v.weight_dtype, rngs=rngs)
        self.in_proj = DenseBias(merged, merged, ("vit_merged", "proj_mlp"), **kw)
        self.out_proj = DenseBias(merged, cfg.text_config.hidden_size, ("proj_mlp", "embed"), **kw)

    def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
        """pooled (M, kh*kw, D_vision) -> (M, D_text)."""
        h = self.pre_norm(pooled).reshape(pooled.shape[0], -1)
        return self.out_proj(jax.nn.gelu(self.in_proj(h), approximate=False))
