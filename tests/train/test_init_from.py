"""Starting a run from another run's latest checkpoint (k25.train.init_from): the joint stage's text model
(`init_text_from`) and its errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import early_fusion
from k25.model.config import K2Config
from k25.model.decoder import K2Model
from k25.train.checkpoint import Checkpointer
from k25.train.joint import JointStage


def config(**kw):
    c = early_fusion.get_config("early,smoke")
    c.mesh.devices = 1
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def save_text_run(workdir: str, lm_cfg: K2Config, seed: int) -> dict:
    """A checkpoint as the `lm` stage writes it: params and buffers of a K2Model at the top level."""
    _, params, buffers = nnx.split(K2Model(lm_cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    state = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(7, state, {}, {"step": 7}, force=True)
    ckpt.close()
    return state


@pytest.mark.slow  # eager model builds and orbax saves: ~30 s idle, minutes on a loaded box
def test_joint_stage_starts_from_a_text_checkpoint(tmp_path):
    stage = JointStage(config())
    saved = save_text_run(str(tmp_path), stage.k25_cfg.text_config, seed=5)
    model = JointStage(config(init_text_from=str(tmp_path))).build_model(nnx.Rngs(0))
    got = nnx.to_pure_dict(nnx.state(model.language_model, nnx.Param))
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = stage.build_model(nnx.Rngs(0))  # without it: the seed's own init, not the text run's
    assert not np.array_equal(np.asarray(fresh.language_model.embed_tokens.embedding[...]),
                              np.asarray(model.language_model.embed_tokens.embedding[...]))
    with pytest.raises(ValueError, match="config.init_text_from.*no checkpoint"):
        JointStage(config(init_text_from=str(tmp_path / "missing")))
    other = stage.k25_cfg.text_config.replace(hidden_size=32)
    save_text_run(str(tmp_path / "small"), other, seed=1)
    with pytest.raises(ValueError, match="other shapes"):
        JointStage(config(init_text_from=str(tmp_path / "small"))).build_model(nnx.Rngs(0))
