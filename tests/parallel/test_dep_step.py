"""The multimodal training step: config.dep on and off give the same update (with accumulation)."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from dep_batch import raw_batch, tiny_k25, tiny_model
from tolerance import assert_same_delta

from k25.parallel.mesh import make_mesh
from k25.train.multimodal import (
    dep_enabled,
    device_put_batch,
    make_multimodal_train_step,
    prepare_batch,
    split_microbatches,
)
from k25.train.state import init_state
from k25.train.step import StepConfig


def test_split_microbatches_keeps_each_chunk_with_its_rows():
    cfg = tiny_k25()
    raw = raw_batch(cfg)
    a, b = split_microbatches(raw, cfg, 2)
    # raw_batch puts every image in rows 0-3 and both video chunks in row 4
    assert a["image_grid_thw"].shape[0] == 7 and "video_grid_thw" not in a
    assert b["video_grid_thw"].shape[0] == 2 and "pixel_values" not in b
    assert a["pixel_values"].shape == raw["pixel_values"].shape
    with pytest.raises(ValueError, match="accum_steps=3"):
        split_microbatches(raw, cfg, 3)


def test_dep_enabled_validates():
    assert dep_enabled(ml_collections.ConfigDict({"dep": True})) is True
    assert dep_enabled(ml_collections.ConfigDict({})) is False
    with pytest.raises(ValueError, match="config.dep"):
        dep_enabled(ml_collections.ConfigDict({"dep": "yes"}))


def test_train_step_dep_on_and_off_agree():
    """One step with accumulation over 2 microbatches, QK-Clip and bias balancing on: the custom_vjp DEP
    loss and the end-to-end loss give the same metrics and the same new parameters and buffers."""
    cfg = tiny_k25()
    model_def, params, buffers = tiny_model(cfg)
    raw = raw_batch(cfg)
    mesh = make_mesh({"pp": 1, "dp": 2, "ep": 4})
    step_cfg = StepConfig(accum_steps=2, qk_clip_tau=5.0, bias_update_rate=1e-3, text_cfg=cfg.text_config,
                          text_path=("language_model",))
    tx = optax.sgd(0.5)
    results = {}
    for dep in (True, False):
        batch, plans = prepare_batch(raw, cfg, mesh, dep=dep, accum_steps=2)
        assert len(plans) == 2
        step = make_multimodal_train_step(model_def, tx, optax.constant_schedule(0.5), step_cfg, mesh, dep=dep)
        with jax.set_mesh(mesh):
            results[dep] = jax.jit(step)(init_state(params, buffers, tx), device_put_batch(batch, mesh))
    (s_dep, m_dep), (s_e2e, m_e2e) = results[True], results[False]
    np.testing.assert_allclose(m_dep["loss"], m_e2e["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_dep["grad_norm"], m_e2e["grad_norm"], rtol=1e-5)
    assert int(m_dep["nonfinite_steps"]) == 0
    for new, other, old in zip(jax.tree.leaves((s_dep.params, s_dep.buffers)),
                               jax.tree.leaves((s_e2e.params, s_e2e.buffers)), jax.tree.leaves((params, buffers))):
        assert_same_delta(new, other, old, rtol=1e-5)
