"""`python -m experiments.ablate early_fusion` at smoke size: every arm logs the same text and vision totals,
none logs vision before its injection point, an interrupted arm resumes with exact counters, and the table and
plots are written."""

import json
import os

import pytest

from experiments import ablate, early_fusion
from k25.data.mixture import VisionSchedule
from k25.train import loop


@pytest.mark.slow  # ~3 min on the shared 2-core box: four smoke runs (one interrupted), each compiling a step
def test_ablation_arms_spend_equal_budgets_and_inject_on_time(tmp_path):
    workdir = str(tmp_path)
    overrides = ("mesh.devices=1", "data.read_threads=1")
    # interrupt the mid arm after 3 steps; the ablation must resume it (counters from its checkpoint)
    c = early_fusion.get_config("mid,smoke")
    c.mesh.devices, c.data.read_threads, c.checkpoint_every = 1, 1, 3
    loop.train(c, ablate.run_dir(workdir, "mid", 0), stop_after=3)
    assert not ablate.finished(ablate.run_dir(workdir, "mid", 0), early_fusion.COLUMNS)

    ran = ablate.run_all("early_fusion", 1, workdir, variant="smoke", overrides=overrides)
    assert len(ran) == 3
    assert ablate.run_all("early_fusion", 1, workdir, variant="smoke", overrides=overrides) == []  # all finished

    totals = {}
    for arm in early_fusion.ARMS:
        cfg = early_fusion.get_config(f"{arm},smoke")
        s = VisionSchedule.from_config(cfg.data.vision_ratio, cfg.data.inject_at, cfg.total_steps, cfg.batch_size)
        records = ablate.read_records(ablate.run_dir(workdir, arm, 0))
        assert [r["step"] for r in records] == list(range(1, cfg.total_steps + 1))
        before = 0
        for r in records:  # one record per step (log_every=1)
            text, vision = s.rows_through(r["step"])
            assert (r["tokens/text"], r["tokens/vision"]) == (text * cfg.seq_len, vision * cfg.seq_len)
            if r["step"] <= s.inject_step:
                assert r["tokens/vision"] == 0
            # the step's loss saw vision rows exactly when the counter grew
            assert (r["loss_tokens/vision"] > 0) == (r["tokens/vision"] > before)
            before = r["tokens/vision"]
        totals[arm] = (records[-1]["tokens/text"], records[-1]["tokens/vision"])
    assert len(set(totals.values())) == 1 and totals["early"][1] > 0, totals

    summary = ablate.write_outputs("early_fusion", workdir)
    assert set(summary) == set(early_fusion.ARMS)
    with open(os.path.join(workdir, "table.json")) as f:
        table = json.load(f)
    for arm in early_fusion.ARMS:
        for key, _ in early_fusion.COLUMNS:
            assert 0.0 <= table[arm][key]["mean"] <= 100.0 and table[arm][key]["sem"] == 0.0
    md = open(os.path.join(workdir, "table.md")).read()
    assert all(title in md for _, title in early_fusion.COLUMNS) and "25.8" in md  # the report's row too
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
