"""The joint K2.5 stage ("k25"): interleaved rows, static plan shapes, and `config.dep` from the runtime and
the command line giving the same losses as end-to-end backprop (8 fake devices, mesh dp2 x ep4)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import k25_joint
from k25.train import loop
from k25.train.joint import JointStage
from k25.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(dep: bool):
    c = k25_joint.get_config("smoke")
    c.dep = dep
    c.mesh.dp, c.mesh.ep = 2, 4
    return c


def test_rows_interleave_images_of_several_sizes_and_text():
    stage = JointStage(smoke_config(False))
    raw = stage.data.raw_batch(0, "train", 0, stage.config.batch_size)
    tok = stage.tokenizer
    media = raw["input_ids"] == tok.media_id
    assert media[-1].sum() == 0 and media[:-1].any(axis=1).all()  # last row text-only, the others hold images
    grids = raw["image_grid_thw"]
    assert len({tuple(g) for g in grids}) > 1  # several image sizes, so the rows' vision loads differ
    assert media.sum() == sum(h * w // 4 for _, h, w in grids)
    assert not (raw["loss_mask"].astype(bool) & (raw["targets"] == tok.media_id)).any()  # media never a target
    assert (media.sum(axis=1) <= stage.config.data.max_media_tokens_per_row).all()
    batch = stage.plan(raw)
    spec = stage.batch_spec(stage.config.batch_size)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in spec.items()}


@pytest.mark.slow
def test_smoke_dep_off_and_on_agree(tmp_path):
    """Two steps each way through `loop.train`: equal losses (the same data and the same gradients)."""
    losses = {}
    for dep in (False, True):
        workdir = str(tmp_path / f"dep_{dep}")
        config = smoke_config(dep)
        config.eval_examples = 0 if dep else config.eval_examples  # the eval ignores dep: run it once
        result = loop.train(config, workdir)
        assert result["step"] == 2
        rows = read_metrics(workdir)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
        assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows if "loss" in r)
        assert ("eval/caption_loss" in rows[-1]) == (not dep)
        losses[dep] = [r["loss"] for r in rows if "loss" in r]
    np.testing.assert_allclose(losses[True][0], losses[False][0], rtol=1e-5)
    np.testing.assert_allclose(losses[True][1], losses[False][1], rtol=1e-4)


@pytest.mark.slow
def test_cli_runs_with_dep(tmp_path):
    workdir = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/k25_joint.py:smoke",
           f"--workdir={workdir}", "--config.dep=True", "--config.mesh.dp=2", "--config.mesh.ep=4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dep"] is True
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2]
