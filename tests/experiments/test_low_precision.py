"""`experiments/low_precision.py` through `experiments.ablate`'s outputs: the arms' configs, and the table, paired
late-loss gaps and curves written from run directories with known metrics (no training: the ablation's runs are
ordinary `experiments.run` runs, covered elsewhere)."""

import json
import os

import pytest

from experiments import ablate, low_precision


def test_arms_set_the_layout_numerics_on_the_quickstart():
    c = low_precision.get_config("fp8_bf16_momentum")
    assert (c.model.dtype, c.model.fp8_activations, c.optim.muon_mu_dtype) == ("bfloat16", True, "bfloat16")
    base = low_precision.get_config("bf16")
    assert (base.model.dtype, base.model.fp8_activations, base.optim.muon_mu_dtype) == ("bfloat16", False, "")
    assert low_precision.get_config("f32").model.dtype == "float32"
    assert base.total_steps == 400 and low_precision.get_config("bf16,smoke").total_steps == 6
    with pytest.raises(ValueError, match="low_precision: ARG 'fp8'"):
        low_precision.get_config("fp8")


def _fake_run(path: str, losses: list[float], exact: float) -> None:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"total_steps": 20 * len(losses)}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, loss in enumerate(losses, 1):
            record = {"step": 20 * i, "loss": loss}
            if i == len(losses):
                record.update({f"eval/{k}_exact": exact for k in ("knowledge", "reasoning", "code", "mean")})
            f.write(json.dumps(record) + "\n")


def test_table_pairs_each_arm_with_bf16_at_the_same_seed(tmp_path):
    workdir = str(tmp_path)
    # 8 logged steps: the late quarter is the last 2 records
    base = {0: [5, 4, 3, 2, 2, 2, 1.0, 1.2], 1: [5, 4, 3, 2, 2, 2, 1.4, 1.6]}
    for seed, losses in base.items():
        _fake_run(ablate.run_dir(workdir, "bf16", seed), losses, 0.5)
        _fake_run(ablate.run_dir(workdir, "fp8_activations", seed), [*losses[:-2], losses[-2] + 0.01,
                                                                   losses[-1] + 0.03], 0.25)
    _fake_run(ablate.run_dir(workdir, "f32", 0), [5, 4, 3, 2, 2, 2, 0.9, 0.9], 0.75)  # one seed, paired with bf16 seed 0

    gaps = low_precision.paired_gaps(workdir)
    assert gaps["bf16"]["late_loss"] == pytest.approx([1.1, 1.5])
    assert gaps["fp8_activations"]["gap"] == pytest.approx([0.02, 0.02])
    assert gaps["f32"]["gap"] == pytest.approx([-0.2])
    assert gaps["fp8_activations"]["exact_gap"] == pytest.approx([-25.0, -25.0])  # points
    assert gaps["f32"]["exact_gap"] == pytest.approx([25.0])

    summary = ablate.write_outputs("low_precision", workdir)
    assert summary["fp8_activations"]["eval/mean_exact"]["mean"] == pytest.approx(25.0)  # percent
    assert summary["bf16"]["loss"]["values"] == pytest.approx([1.2, 1.6])  # a loss column keeps its unit
    md = open(os.path.join(workdir, "table.md")).read()
    assert "| bf16 (n=2) | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 1.4000 ± 0.2000 |" in md
    assert "tokens text / vision" not in md and "report:" not in md  # a text-only ablation with no published row
    assert "- Mean exact match: f32 > bf16 > fp8_activations" in md and "- final train loss" not in md
    assert "standard deviation of the bf16 arm: 0.2828" in md
    assert ("| fp8_activations (n=2) | 1.3200 ± 0.2000 | +0.0200 ± 0.0000 | +0.0200, +0.0200 | "
            "-25.0 ± 0.0 (-25.0, -25.0) |") in md
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
    steps, losses = ablate.curves("low_precision", workdir)["train"]["bf16"]
    assert steps == list(range(20, 161, 20)) and losses[-1] == pytest.approx(1.4)  # averaged over seeds
