"""The CLI's console: progress bar, run summary and the final table; library INFO lines go to DIR/log.txt."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFO_LINE = re.compile(r"^I\d{4} ", re.M)  # absl's INFO prefix (I + month/day)


def run_cli(tmp_path, *extra):
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/tiny_lm.py:smoke", f"--workdir={tmp_path}",
           "--config.mesh.devices=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_training_console_is_quiet_and_log_file_keeps_everything(tmp_path):
    r = run_cli(tmp_path, "--config.total_steps=3", "--config.checkpoint_every=2", "--config.eval_at_start=False",
                "--config.eval_examples=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not INFO_LINE.search(r.stderr), r.stderr[:2000]  # no orbax/jax INFO on the console
    assert "k25 stage=lm" in r.stdout and "held-out metric" in r.stdout
    log = (tmp_path / "log.txt").read_text()
    assert "Saving checkpoint" in log or "checkpoint" in log.lower()
    assert INFO_LINE.search(log)


def test_verbosity_flag_brings_info_back(tmp_path):
    r = run_cli(tmp_path, "--dry_run", "--verbosity=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert INFO_LINE.search(r.stderr) and "devices:" in r.stderr
