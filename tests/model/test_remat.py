"""Remat policies: same gradients, and the compiled step keeps fewer bytes live as the policy tightens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tolerance import assert_close_at_scale

from k25.model.config import tiny
from k25.model.decoder import K2Model


def grad_fn(remat: str):
    cfg = tiny(num_hidden_layers=3, remat=remat)
    model = nnx.eval_shape(lambda: K2Model(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)

    def loss(state, ids):
        logits = nnx.merge(graphdef, state)(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return jax.jit(jax.grad(loss)), abstract


def test_policies_give_same_grads_and_save_memory():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (4, 256)), jnp.int32)
    state = nnx.split(nnx.jit(lambda: K2Model(tiny(num_hidden_layers=3), rngs=nnx.Rngs(0)))())[1]
    temps, grads = {}, {}
    for policy in ("none", "selective", "full"):
        fn, _ = grad_fn(policy)
        temps[policy] = fn.lower(state, ids).compile().memory_analysis().temp_size_in_bytes
        grads[policy] = fn(state, ids)
    for policy in ("selective", "full"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy])):
            assert_close_at_scale(a, b, rtol=1e-5)
    assert temps["full"] < temps["selective"] < temps["none"], temps
