"""Rotary position embeddings: plain RoPE and YaRN, computed as transformers' DeepseekV3 does.

The rotation is applied to interleaved pairs (x0, x1), (x2, x3), ... each turned by one
frequency (DeepSeek's `rope_interleave=True` layout); the result is written de-interleaved
(evens then odds), identically for queries and keys, so attention scores are unchanged.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from k25.model.config import RopeScaling


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(dim: int, theta: float, scaling: RopeScaling) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies (dim/2,) and the factor cos/sin are multiplied by."""
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if not scaling.is_yarn:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.mscale and scaling.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        orig = scaling.original_max_position_embeddings
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency (high-frequency dims)
    interp = inv_freq / factor
    inv_freq = (interp * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)
    return inv_freq, float(attention_factor)


def softmax_scale(qk_head_dim: int, scaling: RopeScaling) -> float:
    """1/sqrt(d) times YaRN's mscale(factor, mscale_all_dim)^2, as DeepSeek-V3 scales its logits."""
    scale = qk_head_dim**-0.5
    if scaling.is_yarn and scaling.mscale_all_dim:
        m = _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        scale *= m * m
    return scale


def rope_cos_sin(positions: jnp.ndarray, dim: int, theta: float, scaling: RopeScaling
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape positions.shape + (dim/2,), float32, already times the attention factor."""
    inv_freq, attn_factor = inv_freq_and_attention_factor(dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of the last axis of x (..., seq, heads, dim); cos/sin are (..., seq, dim/2)."""
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
