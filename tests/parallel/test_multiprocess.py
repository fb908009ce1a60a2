"""Two processes on localhost (4 fake CPU devices each) train together and match one process with 8 devices."""

import os
import subprocess
import sys

import numpy as np
import pytest

from k25.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--config=experiments/tiny_lm.py:smoke", "--config.total_steps=3", "--config.log_every=1",
         "--config.checkpoint_every=100", "--config.eval_examples=0", "--config.model.num_hidden_layers=2",
         "--config.model.hidden_size=64", "--config.batch_size=8", "--config.seq_len=64", "--config.mesh.dp=8",
         "--config.host_data=replicate", "--config.async_checkpoints=False"]


def env(devices: int) -> dict:
    return dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / 'one'}", *FLAGS],
                            cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(["bash", "launch/local_cpu.sh", "2", "4", f"--workdir={tmp_path / 'two'}", *FLAGS],
                           cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = [m["loss"] for m in read_metrics(tmp_path / "one")]
    b = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-5)
