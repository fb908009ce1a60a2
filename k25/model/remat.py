"""Activation memory policy for the layer scan (report App. C: selective recomputation).

  * `none`: keep every residual the backward needs.
  * `selective`: recompute exactly the cheap, memory-heavy pieces the report names — the RMSNorms, the
    SwiGLU activations and MLA's up-projections (q_b / kv_b outputs) — and keep everything else. The
    layers tag those values with `checkpoint_name`; the policy saves anything except those names.
  * `full`: keep only each layer's input; recompute the whole layer in the backward.
`remat_offload=True` (with `selective`) instead keeps only the outputs of the weight matmuls and moves
them to pinned host memory (`offload_dot_with_no_batch_dims`), recomputing the rest; it needs a backend
with memory kinds (GPU/TPU). The CPU has one memory space, so there it falls back to plain `selective`.

`fp8=True` (`K2Config.fp8_activations`, report App. C: FP8 storage of insensitive activations) stores the
qualifying residuals of each layer in float8 e4m3 with one f32 scale per row (last axis), and casts them back
in the backward (`fp8_residuals`, a `custom_vjp` around the layer whose forward is exact). A residual
qualifies when it is an activation the model already holds in a 16-bit compute dtype (bf16/f16) with rank
>= 2 and a last axis of at least `FP8_MIN_ROW` elements, and is not one of the layer's inputs (parameters,
the residual stream): the matmul inputs, q/k/v, SwiGLU inputs, expert blocks. f32 residuals are f32 on
purpose (router logits and probabilities, softmax log-sum-exp, norm statistics, the loss) and stay f32; so do
integer ones (expert indices, counts). Under the 1F1B pipeline these float8 leaves are what the slots hold.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# names recomputed by the `selective` policy
NORM = "norm_out"
SWIGLU = "swiglu_act"
MLA_UP = "mla_up_proj"
RECOMPUTED = (NORM, SWIGLU, MLA_UP)
POLICIES = ("none", "selective", "full")
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
FP8_MIN_ROW = 16  # shorter rows (per-row statistics, tiny heads) are not worth a scale each


def tag(x: jax.Array, name: str) -> jax.Array:
    return checkpoint_name(x, name)


def fp8_qualifies(x: jax.Array) -> bool:
    """A residual stored in float8: a 16-bit floating activation of rank >= 2 with rows of >= FP8_MIN_ROW."""
    return (x.dtype in (jnp.bfloat16, jnp.float16) and x.ndim >= 2 and x.shape[-1] >= FP8_MIN_ROW)


def fp8_quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x -> (float8 e4m3 values, f32 scale per row): x ~= values * scale, the row's max mapped to 448."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (x.astype(jnp.float32) / scale).astype(FP8), scale


def fp8_dequantize(q: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)


def fp8_residuals(f: Callable) -> Callable:
    """`f` with its qualifying VJP residuals (`fp8_qualifies`) stored in float8; the forward is unchanged.

    A `custom_vjp` whose forward runs `jax.vjp(f)` and returns the VJP's leaves as its residuals, the
    qualifying ones quantized; the backward dequantizes them and applies the rebuilt VJP. Every argument
    is a primal (integer/bool ones get float0 cotangents). Leaves that are arguments (the parameters, the
    layer input) are passed through at full precision.
    """
    static: dict = {}

    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def fwd(*args):
        out, vjp_fn = jax.vjp(f, *args)
        leaves, static["treedef"] = jax.tree.flatten(vjp_fn)
        arg_ids = {id(a) for a in jax.tree.leaves(args)}
        keep = [id(leaf) in arg_ids or not fp8_qualifies(leaf) for leaf in leaves]
        static["dtypes"] = [None if k else leaf.dtype for leaf, k in zip(leaves, keep)]
        return out, [leaf if k else fp8_quantize(leaf) for leaf, k in zip(leaves, keep)]

    def bwd(res, ct):
        leaves = [r if dt is None else fp8_dequantize(*r, dt) for r, dt in zip(res, static["dtypes"])]
        return tuple(jax.tree.unflatten(static["treedef"], leaves)(ct))

    g.defvjp(fwd, bwd)
    return g


def remat_wrapper(policy: str, offload: bool = False, fp8: bool = False) -> Callable | None:
    """A wrapper for a scan body (`jax.checkpoint` by policy, then `fp8_residuals` with fp8), or None."""
    if policy == "none":
        ckpt = None
    elif policy == "full":
        ckpt = lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)  # noqa: E731
    elif policy == "selective":
        if offload and jax.default_backend() != "cpu":
            pol = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        else:
            pol = jax.checkpoint_policies.save_anything_except_these_names(*RECOMPUTED)
        ckpt = lambda f: jax.checkpoint(f, policy=pol)  # noqa: E731
    else:
        raise ValueError(f"remat={policy!r} must be one of {POLICIES}.")
    if not fp8:
        return ckpt
    return (lambda f: fp8_residuals(ckpt(f))) if ckpt is not None else fp8_residuals
