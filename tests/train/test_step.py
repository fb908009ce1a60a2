"""The training step's update: equal to the plain optimizer + QK-Clip + balancing sequence; a non-finite step
changes nothing. The step applies its update under a `lax.cond` (so the donated optimizer state is updated in
place); these tests pin it to the straightforward formulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k25.model.moe import balance_bias_update
from k25.optim.muon_clip import qk_clip
from k25.train import loop, stage
from tests.lm_configs import small_lm_config
from tests.train.test_loop import NaNStage


def _trainer(tmp_path, **kw) -> loop.Trainer:
    c = small_lm_config(layers=2, batch=4, seq_len=64)
    c.mesh.devices = 1
    c.optim.qk_clip_tau = 0.05 # low enough that this small model's heads are clipped in the first step
    for k, v in kw.items():
        c[k] = v
    return loop.Trainer(c, str(tmp_path))


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_step_equals_optimizer_then_qk_clip_then_bias_update(tmp_path):
    t = _trainer(tmp_path)
    cfg = t.stage.step_config()
    state = t.init_state()
    batch = t.global_batch(next(t.stage.train_iterator(0, 0, 1)))
    before = _host(state)

    def loss(p):
        return t.stage.loss_fn(t.model_def.merge(p, before.buffers), batch)

    (loss_sum, aux), grads = jax.value_and_grad(loss, has_aux=True)(before.params)
    grads = jax.tree.map(lambda g: g / aux["num_tokens"], grads)
    updates, want_opt = t.optimizer.update(grads, before.opt_state, before.params)
    want_params, clipped = qk_clip(optax.apply_updates(before.params, updates), aux["max_attn_logits"],
                                   cfg.text_cfg, cfg.qk_clip_tau)
    bias = before.buffers["moe_layers"]["mlp"]["bias"]
    want_bias = balance_bias_update(bias, aux["expert_counts"], cfg.bias_update_rate)

    new, metrics = t.step(state, batch)
    assert int(metrics["qk_clip/clipped_heads"]) == int(clipped) > 0
    assert int(new.nonfinite_total) == 0 and int(new.step) == 1
    np.testing.assert_allclose(np.asarray(new.buffers["moe_layers"]["mlp"]["bias"]), want_bias, rtol=1e-6, atol=1e-7)
    for got, want in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((want_params, want_opt))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert not np.array_equal(np.asarray(new.buffers["moe_layers"]["mlp"]["bias"]), bias)


def test_nonfinite_step_leaves_params_buffers_and_optimizer_state_bit_equal(tmp_path, monkeypatch):
    monkeypatch.setitem(stage.STAGES, "nan_lm", f"{NaNStage.__module__}:NaNStage")
    t = _trainer(tmp_path, stage="nan_lm")
    state = t.init_state()
    batch = t.global_batch(next(t.stage.train_iterator(0, 0, 1)))
    before = _host(state)
    new, metrics = t.step(state, batch)  # `state` is donated
    assert int(new.step) == 1 and int(new.nonfinite_total) == 1 and int(new.nonfinite_streak) == 1
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["qk_clip/clipped_heads"]) == 0
    for got, want in zip(jax.tree.leaves((new.params, new.buffers, new.opt_state)),
                         jax.tree.leaves((before.params, before.buffers, before.opt_state))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
    assert jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(new.params)[0]))
