"""Collectives that move 16-bit floats as their bits.

XLA:CPU's float normalisation widens a bf16 (or f16) `all_to_all` to f32: every piece of the send buffer is
converted to a full-size f32 copy and the receive buffer is assembled in f32 (8.5 GB per device for the stages'
bf16 expert weights in the K2 layout, 3.8 GB per expert exchange). The same bytes moved as uint16 are not
touched, and a bitcast on either side makes it exact. Accelerator backends move bf16 natively; there the
bitcasts are free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def all_to_all_bits(x: jax.Array, axis: str, split: int, concat: int) -> jax.Array:
    """`jax.lax.all_to_all(x, axis, split, concat, tiled=True)`, a 16-bit float `x` moved as uint16 bits; its
    transpose is the reverse all_to_all, moved the same way (exact in both directions)."""
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return jax.lax.all_to_all(x, axis, split, concat, tiled=True)
    y = jax.lax.all_to_all(jax.lax.bitcast_convert_type(x, jnp.uint16), axis, split, concat, tiled=True)
    return jax.lax.bitcast_convert_type(y, x.dtype)


def _fwd(x: jax.Array, axis: str, split: int, concat: int) -> tuple[jax.Array, None]:
    return all_to_all_bits(x, axis, split, concat), None


def _bwd(axis: str, split: int, concat: int, _: None, ct: jax.Array) -> tuple[jax.Array]:
    return (all_to_all_bits(ct, axis, concat, split),)


all_to_all_bits.defvjp(_fwd, _bwd)
