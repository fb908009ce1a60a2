"""FP8 activation storage (`K2Config.fp8_activations`): same forward, gradients within float8's rounding.

Tolerance: e4m3 keeps 3 mantissa bits, so a stored element is off by at most 2^-4 of itself (half an ulp)
relative to the bf16 value, with the row's max mapped to 448 (no overflow; values below 2^-6 of the row max
lose bits to subnormals). The errors are unbiased rounding errors entering linear maps: a gradient element
that is a sum of terms t_i (over tokens) is off by at most 2^-4 * sum |t_i|, i.e. 2^-4 relative where the
terms share a sign and more where they cancel (norm scales and other sums of signed products). So the
whole gradient (all leaves as one vector) must agree to relative L2 error < 2^-4, each leaf to < 2^-3
(a cancellation factor of 2), against the bf16 model without FP8; and the FP8 error must be larger than
zero (the residuals really were quantized).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.model.remat import FP8, fp8_dequantize, fp8_qualifies, fp8_quantize, fp8_residuals


def _grads(ids, **cfg):
    model = nnx.jit(lambda: K2Model(tiny(num_hidden_layers=3, param_dtype="float32", **cfg), rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)

    def loss(state, ids):
        logits = nnx.merge(graphdef, state)(ids).logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))(state, ids)


@pytest.fixture(scope="module")
def runs():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 128)), jnp.int32)
    return {name: _grads(ids, **cfg) for name, cfg in {
        "bf16": dict(dtype="bfloat16", remat="selective"),
        "fp8": dict(dtype="bfloat16", remat="selective", fp8_activations=True),
    }.items()}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_forward_is_unchanged(runs):
    assert float(runs["fp8"][0]) == float(runs["bf16"][0])


def test_gradients_agree_within_fp8_rounding(runs):
    errs = []
    leaves = [jax.tree_util.tree_leaves_with_path(runs[k][1]) for k in ("fp8", "bf16")]
    for (path, g), (_, ref) in zip(*leaves):
        if not np.any(np.asarray(ref)):
            continue
        e = _rel(g, ref)
        assert e < 2 ** -3, (jax.tree_util.keystr(path), e)
        errs.append(e)
    flat = [np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(runs[k][1])])
            for k in ("fp8", "bf16")]
    assert 0 < _rel(*flat) < 2 ** -4, _rel(*flat)
    assert max(errs) > 0


def test_quantize_roundtrip_error_bound():
    x = (jax.random.normal(jax.random.key(0), (64, 256)) * jnp.logspace(-3, 3, 64)[:, None]).astype(jnp.bfloat16)
    q, s = fp8_quantize(x)
    assert q.dtype == FP8 and s.shape == (64, 1)
    y = np.asarray(fp8_dequantize(q, s, jnp.bfloat16), np.float32)
    xf = np.asarray(x, np.float32)
    amax = np.abs(xf).max(-1, keepdims=True)
    # normal range: relative error <= 2^-4 (+ bf16 rounding of the result); subnormals: absolute 2^-9 * scale
    bound = np.maximum(np.abs(xf) * (2 ** -4 + 2 ** -8), amax / 448 * 2 ** -9 * 1.01)
    assert np.all(np.abs(y - xf) <= bound)
    assert fp8_qualifies(x) and not fp8_qualifies(x.astype(jnp.float32)) and not fp8_qualifies(x[:, :8])


def test_wrapper_stores_float8_residuals():
    """The custom_vjp's residuals are float8 for a bf16 activation and untouched for the f32/int ones."""
    w = jax.random.normal(jax.random.key(1), (64, 64), jnp.float32)

    def layer(w, x):
        h = x @ w.astype(jnp.bfloat16)
        return jnp.tanh(h).sum(-1).astype(jnp.float32)

    x = jax.random.normal(jax.random.key(2), (32, 64), jnp.bfloat16)
    _, vjp = jax.vjp(fp8_residuals(layer), w, x)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(vjp)}
    assert jnp.dtype(FP8) in dtypes
    gw, gx = jax.grad(lambda w, x: fp8_residuals(layer)(w, x).sum(), (0, 1))(w, x)
    rw, rx = jax.grad(lambda w, x: layer(w, x).sum(), (0, 1))(w, x)
    # tanh's derivative uses the stored pre-activation nonlinearly: within 2^-3, as the per-leaf bound above
    assert _rel(gw, rw) < 2 ** -3 and _rel(gx.astype(jnp.float32), rx.astype(jnp.float32)) < 2 ** -3
