"""The ragged expert exchange (`K2Config.ep_exchange="ragged"`, k25/parallel/expert.py).

XLA:CPU cannot compile `jax.lax.ragged_all_to_all`, so on CPU the exchange's bookkeeping (offsets, sizes,
the receive layout, the combine and their gradients) runs on `dense_ragged_all_to_all`, a reference of the
primitive's documented semantics built from dense collectives; the reference itself is checked on the
documentation's worked example, and against the primitive where a backend compiles it. The model's ragged
path lowers to the primitive on CPU, and a CPU run stops with an error naming the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_expert import MESHES, masked_moe, mesh_of, skewed_routing, value_and_grads
from tolerance import assert_close_at_scale

from k25.model import moe
from k25.model.config import tiny
from k25.parallel.expert import (
    a2a_bytes_per_step,
    check_exchange_backend,
    expert_parallel_moe,
    ragged_receive_rows,
)


def dense_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` (one slice per device) from a gather, a dense all_to_all and a scatter."""
    n, m = operand.shape[0], output.shape[0]
    r = jnp.arange(n)
    src = jnp.where(r[None] < send_sizes[:, None], input_offsets[:, None] + r[None], n)
    got = jax.lax.all_to_all(operand.at[src].get(mode="fill", fill_value=0), axis_name, 0, 0)  # [i]: from i
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where sender i writes here
    dst = jnp.where(r[None] < recv_sizes[:, None], where[:, None] + r[None], m)
    return output.at[dst.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


def _docs_example(a2a):
    """The worked example of `jax.lax.ragged_all_to_all`'s docstring, on 2 devices."""
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    args = [np.array(v, np.float32 if i < 2 else np.int32) for i, v in enumerate([
        [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 1], [0, 1]], [[1, 2], [1, 1]],
        [[0, 0], [1, 2]], [[1, 1], [2, 1]]])]

    def body(*a):
        return a2a(*(v[0] for v in a), axis_name="x")[None]

    sharded = [jax.device_put(v, NamedSharding(mesh, P("x"))) for v in args]
    return np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(*sharded))


def test_dense_reference_reproduces_the_documented_example():
    np.testing.assert_array_equal(_docs_example(dense_ragged_all_to_all), [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.skipif(jax.default_backend() == "cpu" or len(jax.devices()) < 2,
                    reason="needs 2 devices of a backend that compiles ragged_all_to_all (XLA:CPU does not)")
def test_dense_reference_equals_the_primitive():
    np.testing.assert_array_equal(_docs_example(jax.lax.ragged_all_to_all), _docs_example(dense_ragged_all_to_all))


def ragged(idx, factor=0.0):
    return lambda x, wt, *w: expert_parallel_moe(x, wt, jnp.asarray(idx), *w, "blocked", 8, factor,
                                                 exchange="ragged", ragged_a2a=dense_ragged_all_to_all)


@pytest.mark.parametrize("shape", MESHES)
def test_dropless_ragged_exchange_equals_the_static_exchange_and_one_device(shape):
    cfg, idx, weights, x, cot, w = skewed_routing(64)
    keep = np.ones(idx.shape, bool)
    (_, (out0,)), grads0 = value_and_grads(lambda x, wt, *w: (masked_moe(x, wt, idx, keep, *w),), cot)(x, weights, *w)
    static = lambda x, wt, *w: expert_parallel_moe(x, wt, jnp.asarray(idx), *w, "blocked", 8)  # noqa: E731
    with jax.set_mesh(mesh_of(shape)):
        (_, (out, counts, dropped)), grads = value_and_grads(ragged(idx), cot)(x, weights, *w)
        (_, (out_s, counts_s, _)), grads_s = value_and_grads(static, cot)(x, weights, *w)
    assert int(dropped) == 0
    np.testing.assert_array_equal(counts, counts_s)
    np.testing.assert_array_equal(counts, np.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts))
    np.testing.assert_array_equal(out, out_s)  # same rows, same grouped GEMM: bit-equal to the static exchange
    np.testing.assert_allclose(out, out0, atol=1e-4, rtol=1e-4)
    for name, a, b, c in zip(("x", "weights", "gate", "up", "down"), grads, grads_s, grads0):
        assert_close_at_scale(a, b, rtol=1e-5, ulps=64, err_msg=name)
        np.testing.assert_allclose(a, c, atol=1e-4, rtol=1e-4, err_msg=name)


def kept_ragged(idx: np.ndarray, dp: int, ep: int, n_exp: int, factor: float) -> np.ndarray:
    """(T, k) bool: the documented drop rule of the ragged exchange, assignment by assignment.

    Shard s = (dp rank s // ep, ep rank s % ep) holds tokens [s*t, (s+1)*t). Within a dp group, each receiver
    takes R = ragged_receive_rows rows, first from ep rank 0's assignments for it (in (expert, token, slot)
    order), then rank 1's, and so on; the rest are dropped.
    """
    n, k = idx.shape
    shards = dp * ep
    t, e_loc = -(-n // shards), n_exp // ep
    rows = ragged_receive_rows(t, k, e_loc, ep, factor)
    keep = np.zeros(idx.shape, bool)
    for g in range(dp):
        left = np.full(ep, rows)
        for r in range(ep):
            s = g * ep + r
            for e, i, j in sorted((idx[i, j], i, j) for i in range(s * t, min((s + 1) * t, n)) for j in range(k)):
                dest = e // e_loc
                keep[i, j] = left[dest] > 0
                left[dest] -= keep[i, j]
    return keep


@pytest.mark.parametrize("shape, n", [((1, 2, 4), 64), ((1, 1, 8), 60)])
def test_ragged_capacity_drops_past_each_receivers_rows(shape, n):
    cfg, idx, weights, x, cot, w = skewed_routing(n)
    factor = 1.0
    keep = kept_ragged(idx, shape[1], shape[2], cfg.n_routed_experts, factor)
    assert 0 < (~keep).sum() < keep.size / 2
    (_, (out0,)), grads0 = value_and_grads(lambda x, wt, *w: (masked_moe(x, wt, idx, keep, *w),), cot)(x, weights, *w)
    with jax.set_mesh(mesh_of(shape)):
        (_, (out, counts, dropped)), grads = value_and_grads(ragged(idx, factor), cot)(x, weights, *w)
    assert int(dropped) == (~keep).sum()
    np.testing.assert_array_equal(counts, np.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts))
    np.testing.assert_allclose(out, out0, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), grads, grads0):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_receive_rows_and_wire_bytes():
    assert ragged_receive_rows(16, 4, 2, 8) == 8 * 16 * 2  # every sender's most rows for one rank
    assert ragged_receive_rows(16, 4, 2, 8, 1.0) == 64
    assert ragged_receive_rows(10, 3, 4, 2, 1.3) == 40  # ceil(39) rounded up to 8
    assert ragged_receive_rows(2, 4, 2, 8, 100.0) == 32  # capped at the worst case
    cfg = tiny(ep_exchange="ragged")
    static = tiny()
    tokens, ep, k = 1024, 4, cfg.num_experts_per_tok
    e_loc = cfg.n_routed_experts // ep
    # ragged moves the routed rows only: k / (ep * min(k, E/ep)) of the dropless static buffers
    assert a2a_bytes_per_step(cfg, tokens, ep, 2) * ep * min(k, e_loc) == a2a_bytes_per_step(static, tokens, ep, 2) * k


def test_model_ragged_path_lowers_to_the_primitive_and_cpu_runs_stop_early():
    cfg = tiny(grouped_gemm="blocked", moe_block_size=8, ep_exchange="ragged")
    layer = moe.MoE(cfg, rngs=__import__("flax").nnx.Rngs(0))
    x = jnp.ones((8, 8, cfg.hidden_size), jnp.float32)
    with jax.set_mesh(mesh_of((1, 2, 4))):
        text = jax.jit(jax.grad(lambda x: layer(x)[0].sum())).lower(x).as_text()
    assert text.count("ragged_all_to_all") >= 4  # dispatch and combine, forward and transposed
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r"model\.ep_exchange='ragged'.*'all_to_all'"):
            check_exchange_backend(cfg, ep=4)
    check_exchange_backend(cfg, ep=1)  # no expert parallelism, no exchange
    check_exchange_backend(tiny(), ep=4)


def test_bad_exchange_is_a_config_error():
    with pytest.raises(ValueError, match="ep_exchange='ragged_all_to_all' must be"):
        tiny(ep_exchange="ragged_all_to_all")
    with pytest.raises(ValueError, match="ep_exchange"):
        expert_parallel_moe(jnp.ones((8, 4)), jnp.ones((8, 2)), jnp.zeros((8, 2), jnp.int32),
                            *(jnp.ones((4, 4, 4)),) * 3, mesh=mesh_of((1, 1, 8)), exchange="ragged2")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the early stop is for XLA:CPU")
def test_a_cpu_training_run_with_the_ragged_exchange_names_the_field(tmp_path):
    from lm_configs import small_lm_config

    from k25.train import loop

    c = small_lm_config(layers=3, batch=8, seq_len=16)
    c.mesh.pp, c.mesh.dp, c.mesh.ep, c.mesh.devices = 1, 1, 2, 2
    c.model.ep_exchange = "ragged"
    with pytest.raises(ValueError, match=r"model\.ep_exchange='ragged'"):
        loop.train(c, str(tmp_path / "run"), stop_after=1)
    plan = loop.plan(c, str(tmp_path / "plan"))  # lowering only: the ragged plan lowers on CPU
    assert plan["lowered"]
    with pytest.raises(ValueError, match=r"model\.ep_exchange='ragged'"):
        loop.plan(c, str(tmp_path / "plan"), compile=True)
