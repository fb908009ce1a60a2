"""`python -m experiments.long_context --smoke`: the phases run in order, each from the previous one's weights
with a longer sequence, and every final eval logs eval/retrieval_at_<n> for n = L .. 8L."""

import json
import os

import pytest

from experiments import long_context


@pytest.mark.slow  # ~3 min on the shared 2-core box: four phases, each compiling a step at its length
def test_smoke_phases_chain_and_log_retrieval_at_every_length(tmp_path):
    workdir = str(tmp_path)
    finals = long_context.run_phases(workdir, smoke=True, overrides=("mesh.devices=1",))
    lengths = [long_context.L * m for m in (1, 2, 4, 8)]
    previous = ""
    for phase in long_context.PHASES:
        with open(os.path.join(workdir, phase, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["seq_len"] == long_context.MULTIPLE[phase] * long_context.L and cfg["init_from"] == previous
        assert cfg["model"]["rope_scaling"]["type"] == ("default" if phase == "base" else "yarn")
        for n in lengths:
            assert 0.0 <= finals[phase][f"eval/retrieval_at_{n}"] <= 1.0
            assert f"eval/multikey_at_{n}" in finals[phase] and f"eval/retrieval_at_{n}/depth_100" in finals[phase]
        previous = os.path.join(workdir, phase)
    assert long_context.run_phases(workdir, smoke=True, overrides=("mesh.devices=1",)) == finals  # all finished
    summary = long_context.summarize(finals, long_context.yarn_without_training(workdir, True, ("mesh.devices=1",)))
    assert list(summary["base (no extension)"]["retrieval"]) == lengths
    assert "passkey @1024" in long_context.table_markdown(summary)
    long_context.plot_heatmaps(summary, str(tmp_path / "maps.png"))
    assert os.path.getsize(tmp_path / "maps.png") > 5_000
