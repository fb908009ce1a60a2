"""Basic layers shared by the text and vision towers, each parameter tagged with logical axes.

Logical axis names (mapped to mesh axes by `k25.parallel.mesh`):
  embed, vocab, mlp, heads_q (flattened heads x head dims), q_lora, kv_lora, kv_out,
  exp (expert index), exp_mlp, layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.remat import NORM, SWIGLU, tag
from k25.parallel import vocab as vocab_parallel


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype, std: float | None) -> nnx.Param:
    """A parameter of normal(std) values (ones when std is None), tagged with logical axis names."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel, kernel stored (in, out). No bias: K2 uses none."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, dtype, param_dtype,
                 std: float, rngs: nnx.Rngs):
        self.kernel = param(rngs, (d_in, d_out), axes, param_dtype, std)
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back to the compute dtype (as DeepSeek-V3 does)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.scale = param(rngs, (dim,), (axis_name,), param_dtype, None)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps)
        return tag((self.scale[...].astype(jnp.float32) * y).astype(self.dtype), NORM)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, d_model: int, d_ff: int, *, dtype, param_dtype, std: float, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, std=std, rngs=rngs)
        self.gate_proj = Linear(d_model, d_ff, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d_model, d_ff, ("embed", "mlp"), **kw)
        self.down_proj = Linear(d_ff, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.down_proj(tag(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), SWIGLU))


class Embed(nnx.Module):
    """Token embedding table (vocab, embed); `attend` gives tied-output logits.

    `vocab_axis`: the logical name of the vocab dimension; `VOCAB_SHARD` stores it over the mesh and looks
    rows up without gathering the table (k25/parallel/vocab.py)."""

    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, std: float, rngs: nnx.Rngs,
                 vocab_axis: str = "vocab"):
        self.embedding = param(rngs, (vocab, dim), (vocab_axis, "embed"), param_dtype, std)
        self.dtype = dtype

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        if vocab_parallel.is_sharded(self.embedding):
            return vocab_parallel.lookup(self.embedding[...], ids, self.dtype)
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        if vocab_parallel.is_sharded(self.embedding):
            return vocab_parallel.project(x, self.embedding[...].T, self.dtype)
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
