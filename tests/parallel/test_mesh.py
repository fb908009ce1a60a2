"""Parameter storage on the mesh: stacks whose layer axis does not divide pp are still stored 1/pp per stage."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k25.parallel.mesh import make_mesh, storage_spec
from k25.parallel.pipeline import _to_stages

EXPERT = ("layers", "exp", "embed", "exp_mlp")


def test_k2_stacks_on_the_published_layout():
    mesh = AbstractMesh((16, 2, 16), ("pp", "dp", "ep"))
    # 60 MoE layers on 16 stages: pp moves to the largest free dimension (hidden 7168)
    spec = storage_spec((60, 384, 7168, 2048), EXPERT, mesh)
    assert spec == P(None, "ep", "pp", None)  # pp on dimension 2, not on the layers
    # a stack that divides keeps pp on its layer axis
    spec = storage_spec((48, 384, 7168, 2048), EXPERT, mesh)
    assert spec == P("pp", "ep", None, None)
    # the single dense layer's norm scale (1, 7168) and an axis nothing divides
    assert storage_spec((1, 7168), ("layers", "norm"), mesh) == P(None, "pp")
    assert storage_spec((3, 5), ("layers", None), mesh) == P(None, None)
    # unstacked parameters are untouched
    assert storage_spec((163840, 7168), ("vocab", "embed"), mesh) == P(None, None)


def test_regrouping_pp_sharded_storage_onto_stages_matches_layer_order():
    """`_to_stages` with a stack stored as (L, ..., D/pp) gives each stage exactly its chunks, whole."""
    mesh = make_mesh({"pp": 4, "dp": 1, "ep": 2})
    p, v = 4, 2
    a = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2, 12, 8)), jnp.float32)  # (L, E, D, F)
    spec = storage_spec(a.shape, EXPERT, mesh)
    assert spec[0] == "pp"  # 16 layers divide: give it 13 instead
    b = a[:13]
    spec = storage_spec(b.shape, EXPERT, mesh)
    assert spec == P(None, "ep", "pp", None)
    stored = jax.device_put(b, NamedSharding(mesh, spec))

    @jax.jit
    def regroup(x):
        return _to_stages({"w": x[5:]}, p, v, {"w": spec})["w"]  # 5 layers run outside, 8 in p*v chunks

    with jax.set_mesh(mesh):
        got = regroup(stored)
        hlo = regroup.lower(stored).compile().as_text()
    assert "all-to-all" in hlo and "all-gather" not in hlo  # one exchange, never the whole stack per device
    want = _to_stages({"w": b[5:]}, p, v)["w"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.spec[0] == "pp"
