"""The controlled train/inference mismatch (`rl.sampler.weight_noise`): seeded multiplicative noise of the
configured size on the rollout sampler's weights only; evaluation and the trainer keep the clean weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import rl_text
from k25.rl.trainer import RLStage
from k25.rl.weight_noise import perturb_weights


def test_noise_is_relative_seeded_and_skips_integers():
    w = {"a": jnp.linspace(1.0, 3.0, 200_000).reshape(400, 500), "i": jnp.arange(5), "b": {"c": -jnp.ones(7)}}
    p = perturb_weights(w, 0.1, seed=3, step=5)
    rel = np.asarray(p["a"] / w["a"] - 1)
    assert abs(rel.std() - 0.1) < 0.002 and abs(rel.mean()) < 0.002  # w * (1 + 0.1 eps), eps ~ N(0, 1)
    np.testing.assert_array_equal(p["i"], w["i"])
    assert p["b"]["c"].shape == (7,) and not np.allclose(p["b"]["c"], -1)
    again = perturb_weights(w, 0.1, seed=3, step=5)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)  # a resumed run draws the same noise
    assert not np.allclose(perturb_weights(w, 0.1, seed=3, step=6)["a"], p["a"])  # fresh noise every push
    assert not np.allclose(perturb_weights(w, 0.1, seed=4, step=5)["a"], p["a"])
    assert perturb_weights(w, 0.0, seed=3, step=5) is w
    with pytest.raises(ValueError, match="weight_noise"):
        perturb_weights(w, -0.1, seed=0, step=0)


def test_rollout_pushes_are_perturbed_and_evaluation_pushes_are_not():
    c = rl_text.get_config("smoke")
    c.mesh.devices = 1
    c.rl.sampler.weight_noise = 0.05
    stage = RLStage(c)
    model = stage.build_model(nnx.Rngs(0))
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    clean = jax.tree.leaves(params)

    def sampler_params():  # the sampler's copy of each parameter, found by its path in the trainer's tree
        out, state = [], nnx.to_pure_dict(stage.sampler.state)
        for path in paths:
            node = state
            for k in path:
                node = node[k.key]
            out.append(np.asarray(node))
        return out

    stage.push_weights(params, buffers, step=1)  # what observe_state does before a rollout
    noisy = sampler_params()
    rel = np.concatenate([np.ravel(n / w - 1) for n, w in zip(noisy, clean) if np.all(np.abs(w) > 1e-3)])
    assert 0.04 < rel.std() < 0.06
    for n, e in zip(noisy, jax.tree.leaves(perturb_weights(params, 0.05, int(c.seed), 1))):
        np.testing.assert_array_equal(n, e)
    stage.push_weights(params, buffers)  # evaluation: the trainer's weights exactly
    for n, e in zip(sampler_params(), clean):
        np.testing.assert_array_equal(n, e)


def test_negative_noise_is_a_config_error():
    c = rl_text.get_config("smoke")
    c.rl.sampler.weight_noise = -0.01
    with pytest.raises(ValueError, match="rl.sampler.weight_noise"):
        RLStage(c)
