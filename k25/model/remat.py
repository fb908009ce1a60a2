"""Activation memory policy for the layer scan (report App. C: selective recomputation).

  * `none`: keep every residual the backward needs.
  * `selective`: recompute exactly the cheap, memory-heavy pieces the report names — the RMSNorms, the
    SwiGLU activations and MLA's up-projections (q_b / kv_b outputs) — and keep everything else. The
    layers tag those values with `checkpoint_name`; the policy saves anything except those names.
  * `full`: keep only each layer's input; recompute the whole layer in the backward.
`remat_offload=True` (with `selective`) instead keeps only the outputs of the weight matmuls and moves
them to pinned host memory (`offload_dot_with_no_batch_dims`), recomputing the rest; it needs a backend
with memory kinds (GPU/TPU). The CPU has one memory space, so there it falls back to plain `selective`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

# names recomputed by the `selective` policy
NORM = "norm_out"
SWIGLU = "swiglu_act"
MLA_UP = "mla_up_proj"
RECOMPUTED = (NORM, SWIGLU, MLA_UP)
POLICIES = ("none", "selective", "full")


def tag(x: jax.Array, name: str) -> jax.Array:
    return checkpoint_name(x, name)


def remat_wrapper(policy: str, offload: bool = False) -> Callable | None:
    """A `jax.checkpoint` wrapper for a scan body, or None for `none`."""
    if policy == "none":
        return None
    if policy == "full":
        return lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "selective":
        if offload and jax.default_backend() != "cpu":
            pol = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        else:
            pol = jax.checkpoint_policies.save_anything_except_these_names(*RECOMPUTED)
        return lambda f: jax.checkpoint(f, policy=pol)
    raise ValueError(f"remat={policy!r} must be one of {POLICIES}.")
