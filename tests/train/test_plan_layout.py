"""The published K2 layout (pp16 x dp2 x ep16 = 512 devices, interleaved 1F1B) lowers on emulated CPU devices."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_k2_full_layout_lowers_on_512_emulated_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=512")
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/k2_full.py:layout", f"--workdir={tmp_path}",
           "--dry_run", "--compile"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["devices"] == 512 and plan["mesh"] == {"pp": 16, "dp": 2, "ep": 16} and plan["lowered"]
    assert abs(plan["total_params"] / 1.04e12 - 1) < 0.015 and abs(plan["active_params"] / 32e9 - 1) < 0.03
    # ZeRO-1: optimizer state is split over the data ranks, so per device it is far below the f32 params
    assert plan["optimizer_bytes_per_device"] < plan["param_bytes_per_device"]
    # every stack is stored 1/16 per stage even though 60 MoE layers do not divide into 16 stages
    # (replicating the 60-layer stack over pp was 300.6 GB per device; stored over pp it is 27.6 GB, and 18.2 GB
    # with the embedding and LM head vocab-sharded over all devices, model.shard_vocab)
    assert plan["param_bytes_per_device"] < 20e9
    # selective recomputation + FP8 residuals + 1F1B slots in host memory (the layout's defaults). XLA:CPU has one
    # memory space, so the host share is accounted (plan.json `memory_accounting`). Measured (BUILD_NOTES.md, K2
    # layout memory): 67.9 GB device, 119.2 GB host, 182.1 GB compiled per device (93.3 / 207.4 GB at the start of
    # the round that brought it under 80 GB). The report's accelerators have 80 GB.
    assert plan["memory_accounting"] and plan["host_bytes_per_device"] > 100e9
    assert plan["peak_bytes_per_device"] < plan["compiled_peak_bytes_per_device"] < 185e9
    assert plan["peak_bytes_per_device"] <= 80e9, plan
