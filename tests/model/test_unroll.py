"""`unroll_layers` changes how the layer scans compile, never what they compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tolerance import assert_close_at_scale

from k25.model.config import tiny
from k25.model.decoder import K2Model


def test_unrolled_layers_give_the_same_logits_and_grads():
    cfg = tiny(num_hidden_layers=4, first_k_dense_replace=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)), jnp.int32)
    out = {}
    for unroll in (False, True):
        model = K2Model(dataclasses.replace(cfg, unroll_layers=unroll), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(ids).logits ** 2)

        out[unroll] = jax.jit(jax.value_and_grad(loss))(state)
    np.testing.assert_allclose(float(out[True][0]), float(out[False][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
        assert_close_at_scale(a, b, rtol=1e-5)
