"""ZeRO-1: optimizer state is sharded over the data ranks and training matches the 1-device run."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from lm_configs import small_lm_config

from k25.parallel.mesh import make_mesh
from k25.parallel.zero import zero1_spec
from k25.train import loop
from k25.train.metrics import read_metrics


def small(**mesh):
    c = small_lm_config(layers=3, batch=8, seq_len=64)
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


def test_zero1_spec_prefers_batch_axes_for_muon():
    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    # stacked non-expert matrix (L=8, in, out): layers axis over dp x ep, matrix dims whole
    assert zero1_spec((8, 64, 32), P(None, None, None), mesh, muon=True, expert=False) == P(("dp", "ep"), None, None)
    # experts (L=2, E=16, D, F) already on ep: only dp is left, on the layers axis
    assert zero1_spec((2, 16, 64, 32), P(None, "ep", None, None), mesh, muon=True, expert=True) == \
        P("dp", "ep", None, None)
    # AdamW embedding (V, D): the first dimension that divides
    assert zero1_spec((264, 64), P(None, None), mesh, muon=False, expert=False) == P(("dp", "ep"), None)
    # nothing divides: stays replicated
    assert zero1_spec((3, 5, 7), P(None, None, None), mesh, muon=True, expert=False) == P(None, None, None)


@pytest.mark.slow  # two 8-device training runs in subprocesses (~60 s); the spec tests above stay fast
def test_zero1_dp8_matches_one_device(tmp_path):
    one = small(devices=1)
    loop.train(one, str(tmp_path / "one"))
    eight = small(dp=8)
    result = loop.train(eight, str(tmp_path / "eight"))
    sharded = [x for x in __import__("jax").tree.leaves(result["state"].opt_state)
               if getattr(x, "ndim", 0) and x.addressable_shards[0].data.shape != x.shape]
    assert sharded, "no optimizer-state leaf is sharded"
    a = [m["loss"] for m in read_metrics(tmp_path / "one")]
    b = [m["loss"] for m in read_metrics(tmp_path / "eight")]
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_muon_update_on_sharded_expert_stack_moves_no_data():
    """Newton-Schulz per (layer, expert) matrix on the ZeRO-1 layout (layers on dp, experts on ep) needs no
    collective: every rank owns whole matrices. (optax's merged batch axis made XLA all-gather the stack.)"""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from k25.optim.muon_clip import scale_by_batched_muon

    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    spec = zero1_spec((4, 8, 16, 12), P(None, "ep", None, None), mesh, muon=True, expert=True)
    leaf = jax.ShapeDtypeStruct((4, 8, 16, 12), jnp.float32, sharding=NamedSharding(mesh, spec))
    tx = scale_by_batched_muon()
    state = jax.eval_shape(tx.init, {"w": leaf})
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(
        mesh, spec if s.shape == leaf.shape else P())), state)
    with jax.set_mesh(mesh):  # as the Trainer lowers its step: the layer scan splits its groups by the mesh's dp
        hlo = jax.jit(lambda g, s: tx.update(g, s)).lower({"w": leaf}, state).compile().as_text()
    for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert op not in hlo, op


def test_muon_state_takes_a_smaller_batch_split_before_a_matrix_dimension():
    """K2's 60-layer attention stack on dp2 x ep16: dp on the layers beats dp x ep on a matrix dimension,
    which would make Newton-Schulz work on a sharded matrix (replicated 7168 x 7168 Gram matrices)."""
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((16, 2, 16), ("pp", "dp", "ep"))
    assert zero1_spec((60, 8192, 7168), P(None, "pp", None), mesh, muon=True, expert=False) == \
        P("dp", "pp", None)
    # AdamW leaves take the largest split that divides any free dimension first
    assert zero1_spec((64, 8192), P(None, "pp"), mesh, muon=False, expert=False) == P(("dp", "ep"), "pp")


def test_muon_expert_stack_runs_layer_by_layer_with_equal_results(monkeypatch):
    """Newton-Schulz over an expert stack scans its layers (one local layer's Gram matrices live at a time,
    k25.optim.muon_clip._layer_by_layer) on the ZeRO-1 layout: equal to orthogonalising every matrix at once
    (vmap over layers and experts), no collective, and fewer temporary bytes than the all-at-once vmap."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from optax.contrib._muon import _DEFAULT_NS_COEFFS

    from k25.optim import muon_clip
    from k25.optim.muon_clip import _newton_schulz, scale_by_batched_muon

    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    shape = (16, 8, 64, 48)
    sh = NamedSharding(mesh, zero1_spec(shape, P(None, "ep", None, None), mesh, muon=True, expert=True))
    assert sh.spec[0] == "dp"
    g = jax.device_put(jax.random.normal(jax.random.key(0), shape), sh)
    tx, beta = scale_by_batched_muon(), 0.95
    state = jax.tree.map(lambda s: jax.device_put(s, sh) if s.shape == shape else s, tx.init({"w": g}))
    ns = functools.partial(_newton_schulz, coeffs=jnp.asarray(_DEFAULT_NS_COEFFS), steps=5, eps=1e-8)
    all_at_once = jax.jit(jax.vmap(jax.vmap(ns)), out_shardings=sh)
    with jax.set_mesh(mesh):
        update = jax.jit(lambda g, s: tx.update(g, s)[0])
        got = update({"w": g}, state)["w"]
        hlo = update.lower({"w": g}, state).compile()
    # the same update with every layer at once (the vmap this replaces)
    monkeypatch.setattr(muon_clip, "_layer_by_layer", lambda f, x: jax.vmap(f)(x))
    with jax.set_mesh(mesh):
        tx_vmap = scale_by_batched_muon()
        ref_c = jax.jit(lambda g, s: tx_vmap.update(g, s)[0]).lower({"w": g}, state).compile()
    want = all_at_once((1 + beta / (1 + beta)) * g)  # step 1: Nesterov mu_hat is a multiple of the gradient
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert op not in hlo.as_text(), op
    assert hlo.memory_analysis().temp_size_in_bytes < ref_c.memory_analysis().temp_size_in_bytes


def test_layer_by_layer_in_place_equals_lax_map():
    """`_layer_by_layer` overwrites each layer's slot of the stack in a fori_loop (no zero-filled output stack):
    bit-equal to mapping the layers with `lax.map`, with and without a dp-sharded layer axis."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from optax.contrib._muon import _DEFAULT_NS_COEFFS

    from k25.optim.muon_clip import _layer_by_layer, _newton_schulz

    ns = functools.partial(_newton_schulz, coeffs=jnp.asarray(_DEFAULT_NS_COEFFS), steps=5, eps=1e-8)
    f = jax.vmap(ns)  # one layer's experts
    x = jax.random.normal(jax.random.key(3), (6, 4, 32, 24))
    want = jax.jit(lambda x: jax.lax.map(f, x))(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: _layer_by_layer(f, x))(x)), np.asarray(want))
    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("dp", "ep")))
        got = jax.jit(lambda x: _layer_by_layer(f, x))(xs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_muon_layer_stack_over_the_gram_budget_runs_layer_by_layer(monkeypatch):
    """A stack of single matrices per layer (attention projections) whose f32 Gram matrices together pass
    `GRAM_BUDGET_BYTES` is orthogonalised layer by layer too, on the ZeRO-1 layout: equal to the all-at-once
    vmap it replaces (as the expert stack above); under the budget it stays one vmap. (At this size the loop
    needs more temporary bytes than the vmap; the saving is one layer's Grams against all, which the K2 plan
    measures: BUILD_NOTES.md.)"""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from optax.contrib._muon import _DEFAULT_NS_COEFFS

    from k25.optim import muon_clip
    from k25.optim.muon_clip import _newton_schulz, scale_by_batched_muon

    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    shape = (4, 512, 256)  # Grams 4 x 256^2 x 4 bytes = 1 MiB
    sh = NamedSharding(mesh, zero1_spec(shape, P(None, None, None), mesh, muon=True, expert=False))
    g = jax.device_put(jax.random.normal(jax.random.key(5), shape), sh)
    ns = functools.partial(_newton_schulz, coeffs=jnp.asarray(_DEFAULT_NS_COEFFS), steps=5, eps=1e-8)
    want = jax.jit(jax.vmap(ns))((1 + 0.95 / 1.95) * g)  # step 1: Nesterov mu_hat is a multiple of the gradient
    calls = []
    layer_by_layer = muon_clip._layer_by_layer
    monkeypatch.setattr(muon_clip, "_layer_by_layer", lambda f, x: calls.append(x.shape) or layer_by_layer(f, x))
    out = {}
    for budget in (1 << 20, 4 * 256 * 256 * 4 - 1):  # under the budget, then just over it
        monkeypatch.setattr(muon_clip, "GRAM_BUDGET_BYTES", budget)
        tx = scale_by_batched_muon()
        state = jax.tree.map(lambda s: jax.device_put(s, sh) if s.shape == shape else s, tx.init({"w": g}))
        with jax.set_mesh(mesh):
            update = jax.jit(lambda g, s, tx=tx: tx.update(g, s)[0])
            out[budget] = update({"w": g}, state)["w"]
    assert calls == [shape]  # only the over-budget run went layer by layer
    for got in out.values():
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
