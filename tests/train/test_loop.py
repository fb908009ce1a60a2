"""The runtime: exact resume, signals, non-finite steps, broken checkpoints, accumulation."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_configs import small_lm_config

from k25.train import loop, stage
from k25.train.checkpoint import CheckpointError
from k25.train.metrics import read_metrics
from k25.train.pretrain import TextLMStage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(**kw):
    c = small_lm_config(layers=2, batch=4, seq_len=64, total_steps=6, checkpoint_every=3)
    c.mesh.devices = 1
    for k, v in kw.items():
        c[k] = v
    return c


def losses(workdir):
    return [(m["step"], m["loss"]) for m in read_metrics(workdir)]


def test_resume_gives_identical_losses(tmp_path):
    c = small_config()
    loop.train(c, str(tmp_path / "full"))
    loop.train(c, str(tmp_path / "split"), stop_after=3)
    assert [s for s, _ in losses(tmp_path / "split")] == [1, 2, 3]
    loop.train(c, str(tmp_path / "split"))  # same command again: resumes at step 3
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert [s for s, _ in full] == [s for s, _ in split] == list(range(1, 7))
    np.testing.assert_array_equal([v for _, v in full], [v for _, v in split])


def test_corrupt_checkpoint_names_the_file(tmp_path):
    c = small_config(total_steps=3)
    loop.train(c, str(tmp_path))
    state_dir = tmp_path / "checkpoints" / "3" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            if f.endswith(".json") or "manifest" in f or f.startswith("d"):
                open(os.path.join(root, f), "wb").close()
    c.total_steps = 6
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoints" / "3")):
        loop.train(c, str(tmp_path))


def test_incompatible_checkpoint_is_an_error_not_a_restart(tmp_path):
    c = small_config(total_steps=3)
    loop.train(c, str(tmp_path))
    c.model.hidden_size = 96
    c.total_steps = 6
    with pytest.raises(CheckpointError, match="new --workdir"):
        loop.train(c, str(tmp_path))


class NaNStage(TextLMStage):
    def loss_fn(self, model, batch):
        loss, aux = super().loss_fn(model, batch)
        return loss * jnp.nan, aux


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    monkeypatch.setitem(stage.STAGES, "nan_lm", f"{__name__}:NaNStage")
    c = small_config(stage="nan_lm", max_nonfinite_steps=3, checkpoint_every=100)
    with pytest.raises(loop.NonFiniteError, match="max_nonfinite_steps=3"):
        loop.train(c, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in rows] == [1, 2]


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    c1, c2 = small_config(), small_config()
    c2.optim.accum_steps = 2
    t1, t2 = loop.Trainer(c1, str(tmp_path / "a")), loop.Trainer(c2, str(tmp_path / "b"))
    batch = t1.global_batch(next(t1.stage.train_iterator(0, 0, 1)))
    s1, m1 = t1.step(t1.init_state(), batch)
    s2, m2 = t2.step(t2.init_state(), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/tiny_lm.py:smoke",
           f"--workdir={workdir}", "--config.total_steps=100000", "--config.log_every=1",
           "--config.checkpoint_every=100000", "--config.model.num_hidden_layers=2", "--config.eval_examples=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == read_metrics(workdir)[-1]["step"]


def test_unknown_config_field_fails_at_start(tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/tiny_lm.py:smoke",
           f"--workdir={tmp_path}", "--config.optim.lrr=0.1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0 and "lrr" in r.stderr


def test_eval_and_checkpoint_cadences_need_not_follow_the_log_cadence(tmp_path):
    """eval_every = 3 with log_every = 2 evaluates at 3 and 6 (each eval writes a record); checkpoint_every = 0
    saves only at the end."""
    c = small_config(log_every=2, eval_every=3, checkpoint_every=0, eval_examples=2, eval_at_start=False)
    loop.train(c, str(tmp_path))
    records = read_metrics(tmp_path)
    assert [m["step"] for m in records] == [2, 3, 4, 6]
    assert [m["step"] for m in records if any(k.startswith("eval/") for k in m)] == [3, 6]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [6]


@pytest.mark.parametrize("field,value", [("log_every", 0), ("checkpoint_every", -1), ("eval_every", -5),
                                         ("total_steps", -1), ("keep_checkpoints", 0)])
def test_loop_counters_are_checked_before_anything_is_built(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"config\.{field}={value}: .* --config\.{field} to an integer"):
        loop.train(small_config(**{field: value}), str(tmp_path))
    assert not os.listdir(tmp_path)
