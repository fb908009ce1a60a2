"""The quickstart under the K2 layout's two lossy memory savings, each alone and together, against seed noise.

    python -m experiments.ablate low_precision --seeds 6 --workdir=/tmp/low_precision [--variant=smoke]

The K2 layout (experiments/k2_full.py:layout) fits 80 GB partly by storing activation residuals in float8
(`model.fp8_activations`) and the Muon momentum in bf16 (`optim.muon_mu_dtype`). Both round values the backward
or the next step reads, so unlike the layout's exact changes they can move training. This ablation trains
the quickstart model (experiments/tiny_lm.py) with bf16 compute, which FP8 storage needs (float32 models
have no 16-bit residual to store), under each setting and several seeds. A setting is "unchanged within
noise" when its gap to the bf16 arm at the same seed (the same batches in the same order) is small next to
the spread between seeds. The float32 arm is the quickstart as published, for scale.
"""

from __future__ import annotations

import os
import statistics

import ml_collections

from experiments import ablate, tiny_lm

# arm -> config overrides on top of the quickstart
ARMS: dict[str, dict[str, object]] = {
    "f32": {"model.dtype": "float32"},
    "bf16": {"model.dtype": "bfloat16"},
    "fp8_activations": {"model.dtype": "bfloat16", "model.fp8_activations": True},
    "bf16_momentum": {"model.dtype": "bfloat16", "optim.muon_mu_dtype": "bfloat16"},
    "fp8_bf16_momentum": {"model.dtype": "bfloat16", "model.fp8_activations": True,
                          "optim.muon_mu_dtype": "bfloat16"},
}
COLUMNS = [("eval/knowledge_exact", "Knowledge"), ("eval/reasoning_exact", "Reasoning"),
           ("eval/code_exact", "Code"), ("eval/mean_exact", "Mean exact match"),
           ("loss", "final train loss", 1.0)]
CURVES = {"train": ("loss", None)}
BASE = "bf16"  # the arm every lossy setting is paired with
LATE_FRACTION = 0.25  # "late loss": the mean logged train loss over the last quarter of the steps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    if not parts or parts[0] not in ARMS or parts[1:] not in ([], ["smoke"]):
        raise ValueError(f"low_precision: ARG {arg!r} must be one of {list(ARMS)}, optionally followed by ',smoke'.")
    c = tiny_lm.get_config("smoke" if parts[1:] else "")
    c.arm = parts[0]
    c.eval_at_start = False  # the untrained model scores 0 in every arm
    c.eval_every = 0  # evaluate once, at the end: the table's columns
    for field, value in ARMS[parts[0]].items():
        section, name = field.split(".")
        c[section][name] = value
    return c


def finished_runs(workdir: str, arm: str) -> dict[str, tuple[float, float]]:
    """{seed directory: (late loss, final mean exact match in points)} over the arm's finished runs, each read
    once. The late loss is the mean logged train loss over the last LATE_FRACTION of the steps (a single
    step's batch is noisy)."""
    root = os.path.join(workdir, arm)
    out = {}
    for seed in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, seed)
        if not ablate.finished(path, COLUMNS):
            continue
        records = [r for r in ablate.read_records(path) if "loss" in r]
        last = records[-1]["step"]
        late = [r["loss"] for r in records if r["step"] > last * (1 - LATE_FRACTION)]
        out[seed] = (sum(late) / len(late), 100 * records[-1]["eval/mean_exact"])
    return out


def paired_gaps(workdir: str) -> dict[str, dict[str, object]]:
    """{arm: {late_loss: [per seed], gap: [late loss minus BASE's at the same seed], exact_gap: [mean exact
    match minus BASE's at the same seed, in points]}} over finished runs."""
    base = finished_runs(workdir, BASE)
    out: dict[str, dict[str, object]] = {}
    for arm in ARMS:
        runs = base if arm == BASE else finished_runs(workdir, arm)
        paired = [seed for seed in runs if seed in base]
        if runs:
            out[arm] = {"late_loss": [loss for loss, _ in runs.values()],
                        "gap": [runs[s][0] - base[s][0] for s in paired],
                        "exact_gap": [runs[s][1] - base[s][1] for s in paired]}
    return out


def _gap_cells(values: list[float], digits: int) -> tuple[str, str]:
    """("mean ± SEM", "per-seed values") of paired gaps, signed, or ("-", "") when nothing is paired."""
    if not values:
        return "-", ""
    mean, sem = ablate.mean_sem(values)
    return f"{mean:+.{digits}f} ± {sem:.{digits}f}", ", ".join(f"{v:+.{digits}f}" for v in values)


def table_notes(workdir: str) -> str:
    """The paired comparison: each arm's late-loss and exact-match gaps to BASE at the same seed, next to the
    seeds' spread."""
    data = paired_gaps(workdir)
    spread = data.get(BASE, {}).get("late_loss", [])
    sd = statistics.stdev(spread) if len(spread) > 1 else float("nan")
    lines = [f"Late train loss (mean over the last {LATE_FRACTION:.0%} of the steps) and its gap to the {BASE} arm "
             f"at the same seed (same batches); seed-to-seed standard deviation of the {BASE} arm: {sd:.4f}.", "",
             "| arm | late loss | gap to " + BASE + " (same seed) | per-seed gaps | mean exact match gap (points) |",
             "|---|---|---|---|---|"]
    for arm, row in data.items():
        loss_mean, loss_sem = ablate.mean_sem(row["late_loss"])
        gap, per_seed = _gap_cells(row["gap"], 4)
        exact, exact_per_seed = _gap_cells(row["exact_gap"], 1)
        exact_cell = f"{exact} ({exact_per_seed})" if row["exact_gap"] else exact
        lines.append(f"| {arm} (n={len(row['late_loss'])}) | {loss_mean:.4f} ± {loss_sem:.4f} | {gap} | "
                     f"{per_seed} | {exact_cell} |")
    return "\n".join(lines) + "\n"
