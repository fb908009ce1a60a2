"""Grouped SwiGLU over rows sorted by expert: the dropless expert compute.

Two implementations of the same math, chosen by `K2Config.grouped_gemm`:
  * `ragged_dot`: `jax.lax.ragged_dot`, the native grouped GEMM on TPU and GPU.
  * `blocked`: rows are laid out per expert in blocks of `block` rows (each expert's run padded to a
    multiple of `block`), and `lax.map` multiplies each block by its one expert's weights. XLA:CPU
    lowers `ragged_dot` to a dense masked product over every expert (measured 6x slower than the
    one-hot dense baseline at E=64), so the CPU needs this path to get the sparse speedup.
  * `auto`: `blocked` on CPU, `ragged_dot` elsewhere.
Both are dropless: the padded layout has a static bound of N + E*(block-1) rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k25.model.remat import SWIGLU, tag


def _swiglu(x, w_gate, w_up, w_down, dot):
    return dot(tag(jax.nn.silu(dot(x, w_gate)) * dot(x, w_up), SWIGLU), w_down)


def ragged_swiglu(x_sorted: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                  w_down: jnp.ndarray) -> jnp.ndarray:
    return _swiglu(x_sorted, w_gate, w_up, w_down, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes))


def blocked_swiglu(x_sorted: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                   w_down: jnp.ndarray, block: int = 128) -> jnp.ndarray:
    n, d = x_sorted.shape
    e = group_sizes.shape[0]
    num_blocks = -(-(n + e * (block - 1)) // block)
    padded = (group_sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=n)
    dest = (padded_end - padded)[expert_of_row] + jnp.arange(n) - start[expert_of_row]
    xb = jnp.zeros((num_blocks * block, d), x_sorted.dtype).at[dest].set(x_sorted).reshape(num_blocks, block, d)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), e - 1)

    def one_block(args):
        xblk, ex = args
        return _swiglu(xblk, w_gate[ex], w_up[ex], w_down[ex], jnp.dot)

    y = jax.lax.map(one_block, (xb, block_expert))
    return y.reshape(num_blocks * block, -1)[dest]


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl


def grouped_swiglu(x_sorted: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                   w_down: jnp.ndarray, impl: str = "auto", block: int = 128) -> jnp.ndarray:
    """SwiGLU of rows sorted by expert (group_sizes[e] rows for expert e); weights (E, in, out)."""
    dt = x_sorted.dtype
    w_gate, w_up, w_down = (w.astype(dt) for w in (w_gate, w_up, w_down))
    if resolve_impl(impl) == "ragged_dot":
        return ragged_swiglu(x_sorted, group_sizes, w_gate, w_up, w_down)
    return blocked_swiglu(x_sorted, group_sizes, w_gate, w_up, w_down, block)
