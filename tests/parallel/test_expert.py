"""Expert parallelism (k25/parallel/expert.py) equals the single-device MoE: outputs, gradients, counts.

With a capacity factor it equals an independent reference that applies the drop rule per rank pair.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_at_scale

from k25.model import moe
from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.model.remat import remat_wrapper
from k25.parallel.expert import a2a_bytes_per_step, ambient_ep, expert_parallel_moe
from k25.parallel.mesh import batch_sharding, make_mesh, state_shardings
from k25.train.state import split_model

MESHES = [(1, 2, 4), (1, 1, 8), (2, 1, 4)]


def mesh_of(shape):
    return make_mesh(dict(zip(("pp", "dp", "ep"), shape)))


def moe_layer(**overrides):
    """A tiny MoE with a random routing bias and enlarged experts, so routing spreads over all experts."""
    cfg = tiny(moe_block_size=8, **overrides)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    layer.bias[...] = jnp.asarray(rng.normal(0, 0.3, cfg.n_routed_experts), jnp.float32)
    layer.router[...] = layer.router[...] * 10.0
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(layer.experts, name)
        w[...] = w[...] * 5.0
    return cfg, layer


def value_and_grad_fn(layer, cot, remat=None):
    """jit(value_and_grad) of sum(out * cot) w.r.t. (params, x), aux (out, counts); and the params."""
    model_def, params, buffers = split_model(layer)

    def f(p, x):
        call = lambda p, x: model_def.merge(p, buffers)(x)
        out, counts = (remat(call) if remat else call)(p, x)
        return jnp.sum(out * cot), (out, counts)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)), params


def on_mesh(layer, params, x, mesh):
    """params and x placed as training places them: experts over ep, batch over (dp, ep)."""
    ps = jax.device_put(params, state_shardings(nnx.split(layer, nnx.Param, ...)[1], mesh))
    return ps, jax.device_put(x, batch_sharding(mesh))


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_ep_moe_matches_single_device(impl):
    cfg, layer = moe_layer(grouped_gemm=impl)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 8, cfg.hidden_size)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    fn, params = value_and_grad_fn(layer, cot)
    (_, (out0, counts0)), grads0 = fn(params, x)
    assert ambient_ep() == 1
    for shape in MESHES:
        mesh = mesh_of(shape)
        fn, _ = value_and_grad_fn(layer, cot)  # a fresh jit: the mesh changes the trace
        with jax.set_mesh(mesh):
            assert ambient_ep() == shape[2]
            (_, (out, counts)), grads = fn(*on_mesh(layer, params, x, mesh))
        np.testing.assert_allclose(out, out0, atol=1e-5, err_msg=str(shape))
        np.testing.assert_array_equal(counts, counts0, err_msg=str(shape))
        jax.tree.map(lambda a, b: assert_close_at_scale(a, b, rtol=1e-4, ulps=64, err_msg=str(shape)),
                     grads, grads0)
    assert float(counts0.sum()) == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok
    assert np.all(np.asarray(counts0).reshape(8, -1).sum(1) > 0)  # every rank receives rows at ep=8


def test_ep_pads_tokens_that_do_not_divide():
    cfg, layer = moe_layer(grouped_gemm="blocked")
    x = jax.random.normal(jax.random.key(3), (1, 13, cfg.hidden_size))  # 13 tokens over dp*ep = 8 ranks
    out0, counts0 = jax.jit(lambda x: layer(x))(x)
    with jax.set_mesh(mesh_of((1, 2, 4))):
        out, counts = jax.jit(lambda x: layer(x))(x)
    np.testing.assert_allclose(out, out0, atol=1e-5)
    np.testing.assert_array_equal(counts, counts0)


@pytest.mark.parametrize("shape", [(1, 2, 4), (2, 1, 4)])
def test_k2_model_logits_and_counts_match(shape):
    cfg = tiny(grouped_gemm="blocked", moe_block_size=8, first_k_dense_replace=2)  # 2 layers of each kind: pp=2
    model = K2Model(cfg, rngs=nnx.Rngs(0))
    model_def, params, buffers = split_model(model)
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size)

    def fwd(p, b, ids):
        o = model_def.merge(p, b)(ids)
        return o.logits, o.expert_counts

    logits0, counts0 = jax.jit(fwd)(params, buffers, ids)
    mesh = mesh_of(shape)
    _, p_state, b_state = nnx.split(model, nnx.Param, ...)
    with jax.set_mesh(mesh):
        args = (jax.device_put(params, state_shardings(p_state, mesh)),
                jax.device_put(buffers, state_shardings(b_state, mesh)), jax.device_put(ids, batch_sharding(mesh)))
        lowered = jax.jit(fwd).lower(*args)
        assert "all_to_all" in lowered.as_text()
        logits, counts = lowered.compile()(*args)
    np.testing.assert_allclose(logits, logits0, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(counts, counts0)


@pytest.mark.parametrize("remat, factor", [("none", 0.0), ("selective", 0.0), ("full", 0.0), ("none", 1.0)])
def test_a2a_bytes_match_the_compiled_all_to_alls(remat, factor):
    cfg, layer = moe_layer(grouped_gemm="blocked", remat=remat, ep_capacity_factor=factor)
    shape = (1, 2, 4)
    mesh, ep, n_dev = mesh_of(shape), shape[2], int(np.prod(shape))
    x = jnp.ones((8, 8, cfg.hidden_size), jnp.float32)
    fn, params = value_and_grad_fn(layer, x, remat_wrapper(remat))
    with jax.set_mesh(mesh):
        text = fn.lower(*on_mesh(layer, params, x, mesh)).as_text()
    float_bytes = 0
    for dims in re.findall(r"stablehlo\.all_to_all.*?-> tensor<([0-9x]+)xf32>", text):
        float_bytes += int(np.prod([int(d) for d in dims.split("x")])) * 4
    off_device = float_bytes * n_dev * (ep - 1) // ep  # each device keeps its own chunk
    tokens = x.shape[0] * x.shape[1]
    assert off_device * cfg.num_moe_layers == a2a_bytes_per_step(cfg, tokens, ep, 4)
    t = tokens // n_dev  # tokens per rank (pp = 1): capacity 8 rows per pair, 1/4 of the worst case 32
    assert off_device * cfg.num_moe_layers == a2a_bytes_per_step(cfg, tokens, ep, 4, tokens_per_rank=t)
    assert a2a_bytes_per_step(cfg, tokens, 1, 4) == 0
    if factor:
        dropless = a2a_bytes_per_step(cfg, tokens, ep, 4, capacity_factor=0.0)
        assert dropless == 4 * a2a_bytes_per_step(cfg, tokens, ep, 4)


def test_experts_not_divisible_by_ep_is_an_error():
    cfg, layer = moe_layer(n_routed_experts=12)
    x = jnp.ones((1, 8, cfg.hidden_size), jnp.float32)
    with jax.set_mesh(mesh_of((1, 1, 8))), pytest.raises(ValueError, match=r"n_routed_experts=12.*mesh\.ep=8"):
        layer(x)


def test_ep_capacity_that_reaches_the_worst_case_matches_single_device():
    """c = 8 >= ep gives every pair the dropless worst case: nothing drops, gradients included."""
    cfg, layer = moe_layer(grouped_gemm="blocked")
    _, capped = moe_layer(grouped_gemm="blocked", ep_capacity_factor=8.0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 8, cfg.hidden_size)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    fn, params = value_and_grad_fn(layer, cot)
    (_, (out0, counts0)), grads0 = fn(params, x)
    for shape in [(1, 2, 4), (1, 1, 8)]:
        mesh = mesh_of(shape)
        fn, _ = value_and_grad_fn(capped, cot)
        with jax.set_mesh(mesh):
            (_, (out, counts)), grads = fn(*on_mesh(capped, params, x, mesh))
        np.testing.assert_allclose(out, out0, atol=1e-5, err_msg=str(shape))
        np.testing.assert_array_equal(counts, counts0, err_msg=str(shape))
        jax.tree.map(lambda a, b: assert_close_at_scale(a, b, rtol=1e-4, ulps=64, err_msg=str(shape)),
                     grads, grads0)


def kept_assignments(idx: np.ndarray, shards: int, ep: int, n_exp: int, factor: float) -> np.ndarray:
    """(T, k) bool: which assignments survive a per-(sender, receiver) capacity, by the documented rule.

    Tokens split into `shards` consecutive blocks of t = ceil(T/shards) (the last one padded); each block
    sends its assignments in (expert, token, slot) order, and a destination rank takes the first C of them.
    """
    n, k = idx.shape
    t, e_loc = -(-n // shards), n_exp // ep
    cap = min(-(-math.ceil(factor * t * k / ep) // 8) * 8, t * min(k, e_loc))
    keep = np.zeros(idx.shape, bool)
    for s in range(shards):
        rows = sorted((idx[i, j], i, j) for i in range(s * t, min((s + 1) * t, n)) for j in range(k))
        taken = np.zeros(ep, int)
        for e, i, j in rows:
            keep[i, j] = taken[e // e_loc] < cap
            taken[e // e_loc] += 1
    return keep


def masked_moe(x, weights, idx, keep, w_gate, w_up, w_down):
    """Per-assignment SwiGLU with each expert's own weights, dropped assignments weighted 0."""
    h = jnp.einsum("td,tkdf->tkf", x, w_gate[idx])
    h = jax.nn.silu(h) * jnp.einsum("td,tkdf->tkf", x, w_up[idx])
    y = jnp.einsum("tkf,tkfd->tkd", h, w_down[idx])
    return jnp.einsum("tkd,tk->td", y, weights * keep)


def skewed_routing(n: int, seed: int = 2):
    """A MoE layer and n tokens routed with a skew (the low experts, on the first ep ranks, are favoured), so
    some ranks receive far more than their average: (cfg, idx, weights, x, cotangent, expert weights)."""
    cfg, layer = moe_layer(grouped_gemm="blocked")
    n_exp, k, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    rng = np.random.default_rng(seed)
    p = np.exp(-np.arange(n_exp) / 3.0)
    idx = np.stack([rng.choice(n_exp, k, replace=False, p=p / p.sum()) for _ in range(n)]).astype(np.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = tuple(getattr(layer.experts, name)[...] for name in ("gate_proj", "up_proj", "down_proj"))
    return cfg, idx, weights, x, cot, w


def value_and_grads(f, cot):
    """jit(value_and_grad) of sum(f(x, weights, *w)[0] * cot) w.r.t. x, weights and the three expert stacks."""
    def value(x, weights, *w):
        out, *aux = f(x, weights, *w)
        return jnp.sum(out * cot), (out, *aux)
    return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2, 3, 4), has_aux=True))


@pytest.mark.parametrize("shape, n", [((1, 2, 4), 64), ((1, 1, 8), 60)])
def test_ep_capacity_drops_the_last_rows_of_each_rank_pair(shape, n):
    cfg, idx, weights, x, cot, w = skewed_routing(n)
    n_exp = cfg.n_routed_experts
    factor, ep = 1.0, shape[2]
    keep = kept_assignments(idx, shape[1] * ep, ep, n_exp, factor)
    assert 0 < (~keep).sum() < keep.size / 2

    (_, (out0,)), grads0 = value_and_grads(lambda x, wt, *w: (masked_moe(x, wt, idx, keep, *w),), cot)(x, weights, *w)
    with jax.set_mesh(mesh_of(shape)):
        (_, (out, counts, dropped)), grads = value_and_grads(
            lambda x, wt, *w: expert_parallel_moe(x, wt, jnp.asarray(idx), *w, "blocked", 8, factor), cot)(x, weights, *w)
    assert int(dropped) == (~keep).sum()
    np.testing.assert_array_equal(counts, np.bincount(idx.reshape(-1), minlength=n_exp))  # all routed rows
    np.testing.assert_allclose(out, out0, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), grads, grads0):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_negative_ep_capacity_factor_is_an_error():
    with pytest.raises(ValueError, match="ep_capacity_factor"):
        tiny(ep_capacity_factor=-0.5)
    x = jnp.ones((8, 4), jnp.float32)
    with pytest.raises(ValueError, match="ep_capacity_factor"):
        expert_parallel_moe(x, jnp.ones((8, 2)), jnp.zeros((8, 2), jnp.int32), *(jnp.ones((4, 4, 4)),) * 3,
                            capacity_factor=-1.0, mesh=mesh_of((1, 1, 8)))


@pytest.mark.slow
def test_dropped_tokens_reach_metrics_jsonl(tmp_path):
    """Capacity mode's dropped count (`expert_parallel_moe`) is a step metric: `moe/dropped_tokens` in
    metrics.jsonl, 0 when dropless, > 0 with a capacity below the load, also through the 1F1B pipeline (pp=2,
    2 microbatches: summed over the layers before the pipeline, the chunks and the microbatches). Per call the
    count is checked against a numpy re-implementation of the drop rule above."""
    from lm_configs import small_lm_config

    from k25.train import loop
    from k25.train.metrics import read_metrics

    def dropped(name, factor, pp=1, microbatches=1):
        c = small_lm_config(layers=3, batch=8, seq_len=16)
        c.mesh.pp, c.mesh.dp, c.mesh.ep, c.mesh.devices = pp, 1, 2, 2 * pp
        c.pipeline.microbatches, c.pipeline.schedule = microbatches, "1f1b"
        c.model.ep_capacity_factor = factor
        loop.train(c, str(tmp_path / name), stop_after=1)
        return [r["moe/dropped_tokens"] for r in read_metrics(str(tmp_path / name))]

    assert dropped("dropless", 0.0) == [0]
    few = dropped("capacity", 0.25)
    assert few[0] > 0
    piped = dropped("capacity_pp", 0.25, pp=2, microbatches=2)
    assert piped[0] > 0 and piped[0] == int(piped[0])


def test_move_rows_equals_the_plain_gather_and_its_autodiff():
    """`_move_rows` (the exchange's permutations and its combine-side read) is a[idx] with zero fill; its
    hand-written backward, a gather by the inverse map, is bit-equal to autodiff's scatter-add of the plain
    gather (every row receives at most one term), including out-of-range (dropped) entries."""
    from k25.parallel.expert import _move_rows

    rng = np.random.default_rng(0)
    n, d = 12, 5
    a = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    idx = jnp.asarray(np.concatenate([rng.permutation(n)[:9], [n, n + 3]]), jnp.int32)  # 9 reads, 2 out of range
    inv = jnp.full((n,), len(idx), jnp.int32).at[idx].set(jnp.arange(len(idx), dtype=jnp.int32), mode="drop")
    ct = jnp.asarray(rng.normal(size=(len(idx), d)), jnp.bfloat16)

    def plain(a):
        return a.at[idx].get(mode="fill", fill_value=0)

    out, vjp = jax.vjp(lambda a: _move_rows(a, idx, inv), a)
    want, want_vjp = jax.vjp(plain, a)
    np.testing.assert_array_equal(out, want)
    assert not np.any(np.asarray(out[-2:], np.float32))
    np.testing.assert_array_equal(vjp(ct)[0], want_vjp(ct)[0])
    unread = np.setdiff1d(np.arange(n), np.asarray(idx))
    assert not np.any(np.asarray(vjp(ct)[0], np.float32)[unread])


def test_blocked_layout_gather_equals_the_scatter():
    """The blocked grouped GEMM's rows-to-blocks move is a gather by the inverse map; it equals the scatter of
    the rows into zero-padded blocks."""
    from k25.model.grouped_gemm import _block_layout, _to_blocks

    rng = np.random.default_rng(1)
    sizes = jnp.asarray([3, 0, 5, 1], jnp.int32)
    rows = jnp.asarray(rng.normal(size=(9, 4)), jnp.bfloat16)
    dest, block_expert, _ = _block_layout(sizes, 9, 4)
    nb = block_expert.shape[0]
    want = jnp.zeros((nb * 4, 4), jnp.bfloat16).at[dest].set(rows).reshape(nb, 4, 4)
    np.testing.assert_array_equal(_to_blocks(rows, dest, nb, 4), want)
