"""--dry_run: the full K2 run is built and one step lowered without allocating a single weight."""

import json
import os
import subprocess
import sys

from experiments import k2_full
from k25.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_k2_full_plan_lowers_without_weights(tmp_path):
    c = k2_full.get_config()
    c.mesh.devices = 1
    c.batch_size = 2
    plan = loop.plan(c, str(tmp_path))
    assert plan["lowered"] and plan["total_params"] == 1026408209408
    assert plan["param_bytes_per_device"] == 4 * plan["total_params"]  # f32 parameters, replicated
    assert os.path.exists(tmp_path / "plan.json")


def test_dry_run_command_prints_plan(tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/tiny_lm.py:smoke", f"--workdir={tmp_path}",
           "--dry_run", "--compile", "--config.mesh.devices=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"total_params"' in r.stdout and not os.path.exists(tmp_path / "checkpoints")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["peak_bytes_per_device"] == plan["argument_bytes_per_device"] + plan["temp_bytes_per_device"] > 0
