"""The pipeline (k25/parallel/pipeline.py) trains exactly like one device: losses, gradients, statistics.

Every sharded run sets its layout only through config fields (`mesh.pp/dp/ep`, `pipeline.*`), the way
`--config.mesh.pp=2` does, and goes through the runtime (`Trainer`, `loop.train`).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_configs import small_lm_config
from tolerance import assert_close_at_scale

from k25.train import loop
from k25.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (pp, dp, ep), virtual stages, microbatches. The model has 1 dense + 5 MoE layers, so every case also runs
# the MoE layer that does not divide into pp * virtual_stages chunks before the pipeline.
CASES = [((2, 2, 2), 2, 2), ((1, 2, 4), 2, 2), ((2, 1, 4), 1, 4)]


def config(mesh=(1, 1, 1), virtual=1, microbatches=1, schedule="gpipe", devices=0):
    c = small_lm_config(layers=6, batch=16, seq_len=32)
    c.mesh.pp, c.mesh.dp, c.mesh.ep = mesh
    c.mesh.devices = devices
    c.pipeline.virtual_stages, c.pipeline.microbatches, c.pipeline.schedule = virtual, microbatches, schedule
    return c


def gradients_from_moments(opt_state, optim) -> dict:
    """The gradient of the first step, read from the optimizer state after it: AdamW's and Muon's first
    moments start at zero, so after one step they hold exactly (1 - beta) * gradient."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        name = jax.tree_util.keystr(path)
        if ".mu[" in name:
            beta = optim.muon_momentum if "['muon']" in name else optim.b1
            out[name.split(".mu", 1)[1]] = np.asarray(leaf) / (1 - beta)
    return out


def run(c, workdir, steps=3):
    """`steps` jitted `Trainer.step`s from the initial state: the losses, and after the first step its
    metrics, the routing biases (moved by the expert counts) and the gradient (from the moments)."""
    t = loop.Trainer(c, str(workdir))
    state = t.init_state()
    data = t.data_iterator()
    losses, first = [], None
    for _ in range(steps):
        state, metrics = t.step(state, t.global_batch(next(data)))
        losses.append(float(metrics["loss"]))
        if first is None:  # copied to the host now: the next step donates the state's buffers
            first = (gradients_from_moments(state.opt_state, c.optim), jax.device_get(state.buffers),
                     jax.device_get(metrics))
    return first, losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-device run, and a check that the moments give the gradient: against jax.value_and_grad."""
    c = config(devices=1)
    first, losses0 = run(c, tmp_path_factory.mktemp("one"))
    t = loop.Trainer(c, str(tmp_path_factory.mktemp("grad")))
    state = t.init_state()
    batch = t.global_batch(next(t.data_iterator()))

    def loss(params):
        total, aux = t.stage.loss_fn(t.model_def.merge(params, state.buffers), batch)
        return total / aux["num_tokens"]

    with jax.set_mesh(t.mesh):
        grads = jax.device_get(jax.jit(jax.grad(loss))(state.params))
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert set(flat) == set(first[0])
    for name, g in flat.items():
        assert_close_at_scale(first[0][name], g, rtol=1e-4, err_msg=name)
    return first, losses0


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("mesh,virtual,microbatches", CASES,
                         ids=[f"pp{a}dp{b}ep{c}-v{v}-m{m}" for (a, b, c), v, m in CASES])
def test_pipeline_matches_one_device(reference, tmp_path, mesh, virtual, microbatches, schedule):
    (grads0, buffers0, metrics0), losses0 = reference
    (grads, buffers, metrics), losses = run(config(mesh, virtual, microbatches, schedule), tmp_path)
    np.testing.assert_allclose(losses, losses0, rtol=1e-4)
    assert set(grads) == set(grads0)
    for name, g0 in grads0.items():
        assert_close_at_scale(grads[name], g0, rtol=1e-4, err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, buffers, buffers0)  # same expert counts -> same bias update
    for key in ("max_attn_logit", "moe/max_load_over_mean", "moe/expert_load", "qk_clip/clipped_heads",
                "num_tokens"):
        np.testing.assert_allclose(metrics[key], metrics0[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_cli_pipeline_matches_one_device(reference, tmp_path):
    """`python -m experiments.run ... --config.mesh.pp=2 --config.pipeline.*`, as a user would."""
    losses0 = reference[1]
    overrides = {"model.num_hidden_layers": 6, "model.hidden_size": 64, "batch_size": 16, "seq_len": 32,
                 "total_steps": 3, "log_every": 1, "checkpoint_every": 100, "eval_examples": 0,
                 "async_checkpoints": False, "mesh.pp": 2, "mesh.dp": 2, "mesh.ep": 2,
                 "pipeline.virtual_stages": 2, "pipeline.microbatches": 2, "pipeline.schedule": "1f1b"}
    cmd = [sys.executable, "-m", "experiments.run", f"--config={ROOT}/experiments/tiny_lm.py:smoke",
           f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["mesh"]["pp"] == 2 and saved["pipeline"]["schedule"] == "1f1b"
    np.testing.assert_allclose([m["loss"] for m in read_metrics(tmp_path)], losses0, rtol=1e-4)


@pytest.mark.slow
def test_1f1b_needs_less_temporary_memory_than_gpipe(tmp_path):
    """Compiled temp bytes of the loss+gradient at 4 stages, 8 microbatches: 1f1b keeps ~p, gpipe ~m units."""
    temp = {}
    for schedule in ("gpipe", "1f1b"):
        c = config((4, 2, 1), 1, 8, schedule)
        c.model.num_hidden_layers = 5
        c.batch_size = 32
        t = loop.Trainer(c, str(tmp_path))
        st = t.abstract_state
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=t.batch_sharding)
                 for k, v in t.stage.batch_spec(c.batch_size).items()}

        def grads(params, buffers, batch):
            return jax.grad(lambda p: t.stage.loss_fn(t.model_def.merge(p, buffers), batch)[0])(params)

        with jax.set_mesh(t.mesh):
            compiled = jax.jit(grads).lower(st.params, st.buffers, batch).compile()
        temp[schedule] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["1f1b"] < 0.8 * temp["gpipe"], temp


def test_pipeline_config_errors():
    from k25.train.pretrain import TextLMStage

    cases = [
        (dict(schedule="zigzag", microbatches=2), r"config\.pipeline\.schedule='zigzag'.*gpipe"),
        (dict(microbatches=3), r"config\.batch_size=16.*pipeline\.microbatches=3"),
        (dict(virtual=4, microbatches=2, mesh=(2, 1, 1)), r"5 MoE layers.*8 pipeline chunks"),
        (dict(virtual=2, microbatches=3, mesh=(2, 1, 1)), r"microbatches=3 must be a multiple of config\.mesh\.pp=2"),
        (dict(virtual=0), r"virtual_stages=0"),
    ]
    for kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            TextLMStage(config(**kw))
    c = config(microbatches=2)
    c.pipeline.grad_sums_over_dp = True
    with pytest.raises(ValueError, match=r"grad_sums_over_dp needs config\.pipeline\.schedule='1f1b'"):
        TextLMStage(c)


def test_unpipelined_default_is_untouched():
    from k25.train.pretrain import TextLMStage

    assert not TextLMStage(config()).pipeline.enabled
    assert TextLMStage(config(microbatches=2)).pipeline.enabled


def test_pipeline_loss_grads_on_a_toy_stack():
    """pipeline_loss alone, p=4, v=2, m=8, on an MLP stack: gpipe and 1f1b equal plain autodiff."""
    from jax.sharding import Mesh

    from k25.parallel import schedule as sched
    from k25.parallel.pipeline import pipeline_loss

    L, m, mb, d = 16, 8, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(keys[0], (L, d, d)) / np.sqrt(d)
    bias = jax.random.normal(keys[1], (L, d)) * 0.1
    x = jax.random.normal(keys[2], (m, mb, d))
    target = jax.random.normal(keys[3], (m, mb, d))
    head = jnp.ones((d,))

    def layer(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b), jnp.max(h)

    def stage_fn(w, b, h, side):
        h, mx = jax.lax.scan(layer, h * side, (w, b))
        return h, {"max_h": mx, "calls": jnp.ones(w.shape[0])}

    def head_fn(hd, y, t):
        return jnp.sum((y * hd - t) ** 2), {"n": jnp.float32(y.shape[0])}

    def plain(w, hd, x):
        total = 0.0
        for i in range(m):
            h, _ = stage_fn(w, bias, x[i], 1.0)
            total = total + head_fn(hd, h, target[i])[0]
        return total

    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1, 1), ("pp", "dp", "ep"))
    ref_loss, ref_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(w, head, x)
    for kind in sched.SCHEDULES:
        s = sched.build(kind, 4, 2, m)

        def f(w, hd, x):
            return pipeline_loss(s, stage_fn, head_fn, w, bias, hd, x, jnp.ones((m,)), target)

        with jax.set_mesh(mesh):
            (loss, aux), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(w, head, x)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=kind)
        for g, g0 in zip(grads, ref_grads):
            assert_close_at_scale(g, g0, rtol=1e-4, err_msg=kind)
        np.testing.assert_array_equal(aux["calls"], np.full(L, m))  # every layer saw every microbatch once
        assert float(aux["n"]) == m * mb
        activity = np.asarray(aux["pipeline/activity"])
        np.testing.assert_array_equal(activity, s.table[:, :, sched.OP].T)  # the loop ran the schedule's ops
        assert abs(np.mean(activity == sched.IDLE) - sched.bubble_theory(4, 2, m)) < 1e-9


def test_1f1b_offloaded_slots_equal_device_slots():
    """`offload=True` parks the 1F1B residual slots in pinned host memory (moves to and from
    `jax.memory.Space.Host`): the loss and gradients are bit-equal to the slots on the device, and the trace
    records the slot bytes the plan's host accounting uses."""
    from jax.sharding import Mesh

    from k25.parallel import schedule as sched
    from k25.parallel.pipeline import TRACED_SLOTS, pipeline_loss

    L, m, mb, d = 8, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(keys[0], (L, d, d)) / np.sqrt(d)
    x = jax.random.normal(keys[1], (m, mb, d))
    target = jax.random.normal(keys[2], (m, mb, d))

    def stage_fn(w, b, h, side):
        h, mx = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), jnp.max(h)), h, w)
        return h, {"max_h": mx}

    def head_fn(hd, y, t):
        return jnp.sum((y * hd - t) ** 2), {}

    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1), ("pp", "dp", "ep"))
    s = sched.build("1f1b", 2, 2, m)
    out = {}
    for offload in (False, True):
        def f(w, hd, x):
            return pipeline_loss(s, stage_fn, head_fn, w, jnp.zeros((L,)), hd, x, jnp.ones((m,)), target,
                                 offload=offload)

        with jax.set_mesh(mesh):
            out[offload] = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(w, jnp.ones((d,)), x)
        assert TRACED_SLOTS["offload"] is offload and TRACED_SLOTS["slots"] == max(s.res_slots, 1)
        assert TRACED_SLOTS["slot_bytes_per_stage"] == TRACED_SLOTS["slots"] * TRACED_SLOTS["unit_bytes_per_stage"] > 0
    for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True])):
        np.testing.assert_array_equal(a, b)


def _fp8_toy():
    """A pp2 1F1B toy of `fp8_residuals` layers (bf16 matmuls, tanh) with a squared-error head: (mesh, inputs
    (w, hd, x), target, one microbatch's plain loss, the pipelined loss over all four)."""
    from jax.sharding import Mesh

    from k25.model.remat import fp8_residuals
    from k25.parallel import pipeline
    from k25.parallel import schedule as sched

    L, m, mb, d = 4, 4, 16, 32
    keys = jax.random.split(jax.random.key(3), 3)
    w = jax.random.normal(keys[0], (L, d, d)) / np.sqrt(d)
    x = jax.random.normal(keys[1], (m, mb, d))
    target = jax.random.normal(keys[2], (m, mb, d))

    @fp8_residuals
    def layer(w, h):
        return jnp.tanh(jnp.dot(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32) * 0.5)

    def stage_fn(w, b, h, side):
        h, mx = jax.lax.scan(lambda h, w: (layer(w, h), jnp.max(h)), h, w)
        return h, {"max_h": mx}

    def head_fn(hd, y, t):
        return jnp.sum((y * hd - t) ** 2), {}

    def plain(w, hd, x, t):
        return head_fn(hd, stage_fn(w, None, x, None)[0], t)[0]

    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1), ("pp", "dp", "ep"))
    s = sched.build("1f1b", 2, 1, m)

    def f(w, hd, x):
        return pipeline.pipeline_loss(s, stage_fn, head_fn, w, jnp.zeros((L,)), hd, x, jnp.ones((m,)), target)[0]

    return mesh, (w, jnp.ones((d,)), x), target, plain, f


def test_1f1b_float8_residuals_equal_plain_autodiff_without_excess_precision():
    """The pipelined gradients of `fp8_residuals` layers are plain autodiff's, microbatch by microbatch, bit
    for bit, once XLA must round every bf16 value it is asked to (`xla_allow_excess_precision=False`). With
    XLA's default it may keep a bf16 product in f32 where one program fuses and the other does not; on this
    toy that moves the loss in the 6th digit and the gradients by ~0.5 % (bf16 layers) to ~1 % (float8
    residuals, whose per-row scales and rounding see those values) relative L2."""
    mesh, (w, hd, x), target, plain, f = _fp8_toy()
    strict = {"xla_allow_excess_precision": False}
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        loss, grads = step.lower(w, hd, x).compile(strict)(w, hd, x)
    one = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2))).lower(w, hd, x[0], target[0]).compile(strict)
    ref_loss, gw, ghd, gx = 0.0, 0.0, 0.0, []
    for i in range(x.shape[0]):  # the pipeline sums the microbatches' losses and weight gradients in f32, in order
        li, (a, b, c) = one(w, hd, x[i], target[i])
        ref_loss, gw, ghd = ref_loss + li, gw + a, ghd + b
        gx.append(c)
    np.testing.assert_array_equal(loss, ref_loss)
    for a, b in zip(grads, (gw, ghd, jnp.stack(gx))):
        np.testing.assert_array_equal(a, b)


def test_1f1b_float8_residuals_park_as_uint8_bits(monkeypatch):
    """Float8 VJP residuals (model.fp8_activations) wait in uint8 slot buffers, bitcast on the way in and out
    (XLA:CPU widens a float8 buffer to f16 for every slot update and copies it): the bits round-trip, so loss
    and gradients are bit-equal to float8 slot buffers."""
    from k25.parallel import pipeline

    mesh, (w, hd, x), _, _, f = _fp8_toy()
    out, texts = [], []
    for bits in (True, False):
        if not bits:  # the reference: float8 slot buffers
            monkeypatch.setattr(pipeline._OneFOneBTick, "_slot_dtype", staticmethod(lambda t: t))
        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
            texts.append(step.lower(w, hd, x).as_text())
            out.append(step(w, hd, x))
    assert "xui8>" in texts[0] and "xui8>" not in texts[1] and "f8E4M3FN" in texts[1]
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
        np.testing.assert_array_equal(a, b)


def test_1f1b_regroup_in_compute_dtype_is_bit_equal():
    """`regroup_dtypes` casts a stage leaf before the pipeline regroups it (here: stored with `pp` on its
    second dimension, so the regrouping is the all_to_all of the K2 layout). The stage function only uses the
    weights cast to bfloat16, so the forward is unchanged, and the gradients are still summed and regrouped in
    float32: loss and gradients are bit-equal to regrouping the float32 leaves."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from k25.parallel import schedule as sched
    from k25.parallel.pipeline import pipeline_loss

    L, m, mb, d = 8, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(keys[0], (L, d, d)) / np.sqrt(d)
    x = jax.random.normal(keys[1], (m, mb, d))
    target = jax.random.normal(keys[2], (m, mb, d))
    bf16 = jnp.bfloat16

    def stage_fn(w, b, h, side):
        def layer(h, w):
            return jnp.tanh(jnp.dot(h.astype(bf16), w.astype(bf16)).astype(h.dtype)), jnp.max(h)

        h, mx = jax.lax.scan(layer, h, w)
        return h, {"max_h": mx}

    def head_fn(hd, y, t):
        return jnp.sum((y * hd - t) ** 2), {}

    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1), ("pp", "dp", "ep"))
    stored = P(None, "pp")
    s = sched.build("1f1b", 2, 2, m)
    out = {}
    for dtypes in (None, bf16):
        def f(w, hd, x):
            return pipeline_loss(s, stage_fn, head_fn, w, jnp.zeros((L,)), hd, x, jnp.ones((m,)), target,
                                 storage=(stored, None), regroup_dtypes=dtypes)

        with jax.set_mesh(mesh):
            ws = jax.device_put(w, NamedSharding(mesh, stored))
            out[dtypes] = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(ws, jnp.ones((d,)), x)
    (_, _), (gw, _, _) = out[bf16]
    assert gw.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(out[None]), jax.tree.leaves(out[bf16])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="1f1b"):
        pipeline_loss(sched.build("gpipe", 2, 2, m), stage_fn, head_fn, w, jnp.zeros((L,)), jnp.ones((d,)), x,
                      jnp.ones((m,)), target, regroup_dtypes=bf16)


def test_1f1b_grad_sums_sharded_over_dp_are_bit_equal():
    """`grad_shard_axis="dp"` keeps the stages' gradient sums of a leaf regrouped by all_to_all (stored with
    `pp` on its second dimension) sharded over `dp` in the tick loop and through the reverse all_to_all. Over
    dp = 2 a reduce-scatter adds the same two partial sums as the all-reduce it replaces, so loss and
    gradients are bit-equal; the gradient comes out sharded over dp (its full sum is never built)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from k25.parallel import schedule as sched
    from k25.parallel.pipeline import grad_shard_dims, pipeline_loss

    L, m, mb, d = 8, 4, 4, 8
    keys = jax.random.split(jax.random.key(2), 3)
    w = jax.random.normal(keys[0], (L, d, d)) / np.sqrt(d)
    x = jax.random.normal(keys[1], (m, mb, d))
    target = jax.random.normal(keys[2], (m, mb, d))

    def stage_fn(w, b, h, side):
        def layer(h, w):
            return jnp.tanh(h @ w), jnp.max(h)

        h, mx = jax.lax.scan(layer, h, w)
        return h, {"max_h": mx}

    def head_fn(hd, y, t):
        return jnp.sum((y * hd - t) ** 2), {}

    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2, 1), ("pp", "dp", "ep"))
    stored = P(None, "pp")
    s = sched.build("1f1b", 2, 2, m)
    out = {}
    for axis in (None, "dp"):
        def f(w, hd, x):
            return pipeline_loss(s, stage_fn, head_fn, w, jnp.zeros((L,)), hd, x, jnp.ones((m,)), target,
                                 storage=(stored, None), grad_shard_axis=axis)

        with jax.set_mesh(mesh):
            ws = jax.device_put(w, NamedSharding(mesh, stored))
            xs = jax.device_put(x, NamedSharding(mesh, P(None, "dp")))
            out[axis] = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(ws, jnp.ones((d,)), xs)
            assert grad_shard_dims(w, stored, "dp") == 1  # the one unsharded dimension after the layer axis
    for a, b in zip(jax.tree.leaves(out[None]), jax.tree.leaves(out["dp"])):
        np.testing.assert_array_equal(a, b)
    gw = out["dp"][1][0]
    assert "dp" in jax.tree.leaves(tuple(gw.sharding.spec)), gw.sharding
    with pytest.raises(ValueError, match="1f1b"):
        pipeline_loss(sched.build("gpipe", 2, 2, m), stage_fn, head_fn, w, jnp.zeros((L,)), jnp.ones((d,)), x,
                      jnp.ones((m,)), target, grad_shard_axis="dp")


@pytest.mark.slow
def test_lm_grad_sums_over_dp_are_bit_equal(tmp_path):
    """`pipeline.grad_sums_over_dp` on the K2 (pp=2, dp=2, ep=2, 1f1b, v=2): the stages' gradient sums of the
    regrouped stacks stay sharded over dp. The routed experts (sharded over ep) are reduced over dp alone,
    where a reduce-scatter adds the same two partial sums as the all-reduce: bit-equal. The other stacked
    leaves are replicated over ep too, so their four partial sums are added in another order (dp first, then
    ep): a reordered float32 sum of n terms moves by at most (n - 1) eps of the sum of their magnitudes, here
    asserted as relative L2 < 2^-20 per leaf (about 8 eps). The loss is bit-equal."""
    out = {}
    for flag in (False, True):
        c = config((2, 2, 2), 2, 2, "1f1b", devices=8)
        c.pipeline.grad_sums_over_dp = flag
        out[flag] = run(c, tmp_path / str(flag), steps=1)
    (g0, _, _), losses0 = out[False]
    (g1, _, _), losses1 = out[True]
    assert losses1 == losses0 and set(g1) == set(g0)
    for name, a in g0.items():
        if "experts" in name and "shared" not in name:
            np.testing.assert_array_equal(g1[name], a, err_msg=name)
        else:
            assert np.linalg.norm(g1[name] - a) <= 2**-20 * np.linalg.norm(a), name


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
def test_lm_regroup_in_compute_dtype(tmp_path, impl):
    """`pipeline.regroup_in_compute_dtype` on a bfloat16 K2 (pp=2, dp=2, ep=2, 1f1b, v=2): the stages hold the
    routed experts' kernels in bfloat16. With `ragged_dot` (every accelerator path: each unit's expert
    gradient is already a bfloat16 matmul result) loss and gradients are bit-equal. The CPU `blocked` path
    sums a unit's expert gradient over its blocks in float32 and returns it in the weight's dtype, so there
    each unit's expert gradient is rounded to bfloat16 once (relative error <= 2^-9 per element) before the
    float32 sum over the units: a leaf's error is at most 2^-9 of the sum of its units' magnitudes, so in L2
    it is below 2^-9 * (number of units summed, here 2 microbatches) of the leaf's norm when the units do
    not cancel; the bound asserted is relative L2 < 2^-7 per routed-expert leaf (and non-zero: the cast
    happened); every other gradient is bit-equal."""
    out = {}
    for flag in (False, True):
        c = config((2, 2, 2), 2, 2, "1f1b", devices=8)
        c.model.dtype, c.model.grouped_gemm = "bfloat16", impl
        c.pipeline.regroup_in_compute_dtype = flag
        out[flag] = run(c, tmp_path / str(flag), steps=1)
    (g0, _, m0), losses0 = out[False]
    (g1, _, m1), losses1 = out[True]
    assert losses1 == losses0  # the forward is unchanged
    assert set(g1) == set(g0)
    for name, a in g0.items():
        if impl == "ragged_dot" or "experts" not in name or "shared" in name:
            np.testing.assert_array_equal(g1[name], a, err_msg=name)
        else:
            err = np.linalg.norm(g1[name] - a) / np.linalg.norm(a)
            assert 0 < err < 2**-7, (name, err)
