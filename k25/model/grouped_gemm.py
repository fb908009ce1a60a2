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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from k25.model.remat import SWIGLU, tag


def _swiglu(x, w_gate, w_up, w_down, dot):
    return dot(tag(jax.nn.silu(dot(x, w_gate)) * dot(x, w_up), SWIGLU), w_down)


def ragged_swiglu(x_sorted: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                  w_down: jnp.ndarray) -> jnp.ndarray:
    return _swiglu(x_sorted, w_gate, w_up, w_down, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes))


def _block_layout(group_sizes: jnp.ndarray, n: int, block: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(dest (n,) padded row of each sorted row, expert (num_blocks,) of each block, number of used blocks)."""
    e = group_sizes.shape[0]
    num_blocks = -(-(n + e * (block - 1)) // block)
    padded = (group_sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=n)
    dest = (padded_end - padded)[expert_of_row] + jnp.arange(n) - start[expert_of_row]
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), e - 1)
    return dest, block_expert, padded_end[-1] // block


def _zeros(shape: tuple[int, ...], dtype, *like: jnp.ndarray) -> jnp.ndarray:
    """Zeros that vary over the same `shard_map` axes as `like`, so that cond branches and loop carries
    type-check inside the expert-parallel shard_map (k25/parallel/expert.py)."""
    return jnp.broadcast_to(sum(jnp.zeros_like(a.ravel()[0], dtype) for a in like), shape)


def _varying(a: jnp.ndarray) -> frozenset:
    return jax.typeof(a).mat.varying


def _sum_over_extra_axes(grad: jnp.ndarray, param: jnp.ndarray) -> jnp.ndarray:
    """A weight used on every rank of a shard_map axis it is replicated over gets its gradient summed over that
    axis (what autodiff's transpose of the implicit broadcast does; a custom VJP must do it itself)."""
    extra = tuple(sorted(_varying(grad) - _varying(param)))
    return jax.lax.psum(grad, extra) if extra else grad


def _to_blocks(rows: jnp.ndarray, dest: jnp.ndarray, num_blocks: int, block: int) -> jnp.ndarray:
    """Row i to padded row dest[i] (distinct), zeros elsewhere, as a gather: the int32 inverse map is
    scattered, the rows are read. A float scatter here is widened to f32 by XLA:CPU (no bf16 scatter), a
    second f32 copy of every block row in the K2 plan."""
    src = jnp.full((num_blocks * block,), rows.shape[0], jnp.int32).at[dest].set(
        jnp.arange(rows.shape[0], dtype=jnp.int32), mode="promise_in_bounds")
    return rows.at[src].get(mode="fill", fill_value=0).reshape(num_blocks, block, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(x_sorted, group_sizes, w_gate, w_up, w_down, block):
    return _blocked_fwd(x_sorted, group_sizes, w_gate, w_up, w_down, block)[0]


def _blocked_fwd(x_sorted, group_sizes, w_gate, w_up, w_down, block):
    n = x_sorted.shape[0]
    dest, block_expert, used = _block_layout(group_sizes, n, block)
    num_blocks = block_expert.shape[0]
    xb = _to_blocks(x_sorted, dest, num_blocks, block)

    def one_block(args):
        i, xblk, ex = args

        def run(xblk):
            wg, wu, wd = (w[ex].astype(xblk.dtype) for w in (w_gate, w_up, w_down))
            h, u = jnp.dot(xblk, wg), jnp.dot(xblk, wu)
            return jnp.dot(jax.nn.silu(h) * u, wd), h, u

        def skip(xblk):
            f, dt = w_gate.shape[-1], xblk.dtype
            return (_zeros((block, w_down.shape[-1]), dt, xblk, w_down), *(_zeros((block, f), dt, xblk, w_gate),) * 2)

        return jax.lax.cond(i < used, run, skip, xblk)  # trailing all-padding blocks do no work

    y, h, u = jax.lax.map(one_block, (jnp.arange(num_blocks), xb, block_expert))
    out = y.reshape(num_blocks * block, -1).at[dest].get(mode="promise_in_bounds")
    return out, (xb, h, u, dest, block_expert, used, w_gate, w_up, w_down, group_sizes)


def _blocked_bwd(block, res, dy):
    xb, h, u, dest, block_expert, used, w_gate, w_up, w_down, group_sizes = res
    num_blocks = block_expert.shape[0]
    dyb = _to_blocks(dy, dest, num_blocks, block)
    acc = tuple(_zeros(w.shape, jnp.float32, w, xb, dyb) for w in (w_gate, w_up, w_down))

    def one_block(grads, args):
        i, xblk, hb, ub, dyblk, ex = args

        def run(grads):
            dg, du_, dd = grads
            sig = jax.nn.sigmoid(hb)
            act = hb * sig
            wg, wu, wd = (w[ex].astype(xblk.dtype) for w in (w_gate, w_up, w_down))
            da = jnp.dot(dyblk, wd.T)
            dh = da * ub * (sig * (1 + hb * (1 - sig)))
            du = da * act
            dx = jnp.dot(dh, wg.T) + jnp.dot(du, wu.T)
            f32 = jnp.float32
            add = lambda g, d: g.at[ex].add(d.astype(f32))  # noqa: E731
            grads = (add(dg, jnp.dot(xblk.T, dh, preferred_element_type=f32)),
                     add(du_, jnp.dot(xblk.T, du, preferred_element_type=f32)),
                     add(dd, jnp.dot((act * ub).T, dyblk, preferred_element_type=f32)))
            return grads, dx.astype(xblk.dtype)

        return jax.lax.cond(i < used, run, lambda g: (g, _zeros(xblk.shape, xblk.dtype, xblk, dyblk, w_gate)), grads)

    (dg, du, dd), dxb = jax.lax.scan(one_block, acc, (jnp.arange(num_blocks), xb, h, u, dyb, block_expert))
    dx = dxb.reshape(num_blocks * block, -1).at[dest].get(mode="promise_in_bounds")
    zero_sizes = np.zeros(group_sizes.shape, jax.dtypes.float0)
    dw = (_sum_over_extra_axes(g.astype(w.dtype), w) for g, w in ((dg, w_gate), (du, w_up), (dd, w_down)))
    return dx, zero_sizes, *dw


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_swiglu(x_sorted: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                   w_down: jnp.ndarray, block: int = 128) -> jnp.ndarray:
    """The blocked grouped SwiGLU, with a hand-written backward.

    The VJP keeps exactly the block inputs and the two gate/up matmul outputs, and re-slices each block's
    expert weights from the stacks in the backward. Plain autodiff of the block map (under a `selective`
    remat policy) instead saved every block's weight slice: num_blocks copies of an expert's weights,
    which in the K2 plan was f32[12, 65560, 7168, 2048] per device. Weight gradients accumulate in f32. The
    weights enter in their storage dtype and each block's slice is cast to the rows' dtype, so the
    residuals are the parameters themselves (which the 1F1B pipeline does not copy into its slots), not a
    compute-dtype copy of every expert.
    """
    return _blocked(x_sorted, group_sizes, w_gate, w_up, w_down, block)


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl


def grouped_swiglu(x_sorted: jnp.ndarray, group_sizes: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                   w_down: jnp.ndarray, impl: str = "auto", block: int = 128) -> jnp.ndarray:
    """SwiGLU of rows sorted by expert (group_sizes[e] rows for expert e); weights (E, in, out)."""
    if resolve_impl(impl) == "ragged_dot":
        dt = x_sorted.dtype
        return ragged_swiglu(x_sorted, group_sizes, *(w.astype(dt) for w in (w_gate, w_up, w_down)))
    return blocked_swiglu(x_sorted, group_sizes, w_gate, w_up, w_down, block)
