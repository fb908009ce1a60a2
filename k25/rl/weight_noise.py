"""A controlled train/inference mismatch: the rollout sampler's weights with seeded multiplicative noise.

A bf16 sampler beside a float32 trainer is the mismatch of the report's §2.3, but on a tiny model it moves the
logprobs by |log-ratio| ~ 1e-3, too little for Eq. 1's window, TIS or IcePop to act on. Multiplying every
floating-point weight the sampler receives by (1 + sigma * eps), eps ~ N(0, 1) drawn afresh at every push
(keyed by the run's seed and the trainer step, so a resumed run draws the same noise), gives a mismatch whose
size is one config field (`rl.sampler.weight_noise`); the trainer's own weights are never touched. Held-out
evaluation samples from the clean weights: the noise stands for the rollout engine, the policy is the trainer's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("scale",))
def _perturb(tree: Any, key: jax.Array, scale: float) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [w * (1 + scale * jax.random.normal(k, w.shape, jnp.float32)).astype(w.dtype)
           if jnp.issubdtype(w.dtype, jnp.floating) else w for w, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def perturb_weights(params: Any, scale: float, seed: int, step: int) -> Any:
    """w * (1 + scale * eps) for every floating leaf of `params` (integer leaves unchanged); eps ~ N(0, 1),
    a function of (seed, step) only."""
    if scale < 0:
        raise ValueError(f"rl.sampler.weight_noise={scale}: a relative noise scale >= 0")
    if scale == 0:
        return params
    return _perturb(params, jax.random.fold_in(jax.random.key(seed), step), float(scale))
