"""Run every arm of an ablation over several seeds, then write its table and plots.

    python -m experiments.ablate early_fusion --seeds 3 --workdir=/tmp/ef [--variant=smoke] [--set=FIELD=VALUE]

NAME is an experiment module (experiments/NAME.py) that defines `ARMS` (its config ARGs), `COLUMNS`
((metric key, title) of each table column, scored at the end of a run and shown in percent; a third element
replaces that factor of 100, e.g. 1.0 for a loss), `CURVES` ({panel: (sum key, count key)} of per-modality
loss curves from metrics.jsonl; a count key of None plots the sum key's value as it is) and optionally
`EXTRA_COLUMNS` (a second table of the same shape, e.g. a finer-grained score) and `REPORT_TABLE1` (the
published row of each arm). Each run is
`python -m experiments.run --config=experiments/NAME.py:ARM[,VARIANT]
--workdir=DIR/ARM/seed_S --config.seed=S` in its own process; a finished run (its final metrics record
holds the evals) is skipped and an unfinished one resumes from its checkpoint, so the command can be
rerun after an interruption. Writes DIR/table.md, DIR/table.json and DIR/curves.png.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from typing import Any

from absl import app, flags


def run_dir(workdir: str, arm: str, seed: int) -> str:
    return os.path.join(workdir, arm, f"seed_{seed}")


def read_records(path: str) -> list[dict[str, Any]]:
    file = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(file):
        return []
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(path: str, columns: list[tuple]) -> bool:
    """The run reached its config's total_steps and logged the table's metrics there."""
    config = os.path.join(path, "config.json")
    if not os.path.exists(config):
        return False
    with open(config) as f:
        total = json.load(f)["total_steps"]
    return any(r["step"] == total and all(c[0] in r for c in columns) for r in read_records(path))


def run_all(name: str, seeds: int, workdir: str, variant: str = "", overrides: tuple[str, ...] = (),
            arms: tuple[str, ...] = ()) -> list[str]:
    """Runs (or resumes) every unfinished arm x seed; returns the run directories it ran."""
    module = importlib.import_module(f"experiments.{name}")
    unknown = sorted(set(arms) - set(module.ARMS))
    if unknown:
        raise ValueError(f"--arms {unknown} are not arms of {name}; choose from {list(module.ARMS)}.")
    ran = []
    for seed in range(seeds):  # seed-major: every arm of seed 0 finishes before any seed 1 run starts
        for arm in arms or module.ARMS:
            path = run_dir(workdir, arm, seed)
            if finished(path, module.COLUMNS):
                continue
            arg = f"{arm},{variant}" if variant else arm
            cmd = [sys.executable, "-m", "experiments.run", f"--config=experiments/{name}.py:{arg}",
                   f"--workdir={path}", f"--config.seed={seed}", *(f"--config.{o}" for o in overrides)]
            print(f"[ablate] {arm} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
            ran.append(path)
    return ran


def _scale(column: tuple) -> float:
    """A column's factor: percent (100) unless the column gives its own third element."""
    return float(column[2]) if len(column) > 2 else 100.0


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(name: str, workdir: str) -> dict[str, Any]:
    """{arm: {column key: {mean, sem, values}, "tokens/text": [...], "tokens/vision": [...], "seeds": n}} over
    the finished runs under `workdir`, the columns in percent (the report's unit) unless they give a factor."""
    module = importlib.import_module(f"experiments.{name}")
    out: dict[str, Any] = {}
    for arm in module.ARMS:
        seeds = sorted(d for d in os.listdir(os.path.join(workdir, arm))) if os.path.isdir(
            os.path.join(workdir, arm)) else []
        finals = []
        for d in seeds:
            path = os.path.join(workdir, arm, d)
            if finished(path, module.COLUMNS):
                finals.append(read_records(path)[-1])
        if not finals:
            continue
        row: dict[str, Any] = {"seeds": len(finals)}
        for column in [*module.COLUMNS, *getattr(module, "EXTRA_COLUMNS", [])]:
            key = column[0]
            values = [_scale(column) * r[key] for r in finals]
            mean, sem = mean_sem(values)
            row[key] = {"mean": mean, "sem": sem, "values": values}
        for key in ("tokens/text", "tokens/vision"):
            row[key] = [r.get(key) for r in finals]
        out[arm] = row
    return out


def ranking(summary: dict[str, Any], key: str) -> str:
    """Arms ordered best first by their mean on `key`, e.g. 'early > mid = late' (= for equal means)."""
    arms = sorted(summary, key=lambda a: -summary[a][key]["mean"])
    out = arms[:1]
    for prev, arm in zip(arms, arms[1:]):
        out += ["=" if abs(summary[prev][key]["mean"] - summary[arm][key]["mean"]) < 1e-9 else ">", arm]
    return " ".join(out)


def _has_tokens(summary: dict[str, Any]) -> bool:
    """Whether the runs count text and vision tokens (the joint stage does, the text-only stages do not)."""
    return any(row["tokens/text"][0] is not None for row in summary.values())


def _cell(row: dict[str, Any], column: tuple) -> str:
    digits = 1 if _scale(column) == 100.0 else 4  # percent to 0.1; other units (losses) to 4 places
    return f"{row[column[0]]['mean']:.{digits}f} ± {row[column[0]]['sem']:.{digits}f}"


def _rows(summary: dict[str, Any], columns: list[tuple]) -> list[str]:
    tokens = _has_tokens(summary)
    head = "| arm | " + " | ".join(c[1] for c in columns) + (" | tokens text / vision |" if tokens else " |")
    lines = [head, "|" + "---|" * (len(columns) + 1 + tokens)]
    for arm, row in summary.items():
        cells = [_cell(row, c) for c in columns]
        counts = f" {row['tokens/text'][0]:,} / {row['tokens/vision'][0]:,} |" if tokens else ""
        lines.append(f"| {arm} (n={row['seeds']}) | " + " | ".join(cells) + " |" + counts)
    return lines


def table_markdown(name: str, summary: dict[str, Any]) -> str:
    module = importlib.import_module(f"experiments.{name}")
    head = "| arm | " + " | ".join(c[1] for c in module.COLUMNS) + " |"
    lines = _rows(summary, module.COLUMNS)
    extra = getattr(module, "EXTRA_COLUMNS", [])
    if extra:
        lines += ["", getattr(module, "EXTRA_TITLE", "Extra columns:"), "", *_rows(summary, extra)]
    report = getattr(module, "REPORT_TABLE1", {})
    if report:
        lines += ["", "The report's Table 1:", "", head,
                  "|" + "---|" * (len(module.COLUMNS) + 1)]
        for arm, values in report.items():
            lines.append(f"| {arm} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    if summary:
        lines += ["", "Ranking per column (measured; report):" if report else "Ranking per column:", ""]
        for i, (key, title, *_) in enumerate(module.COLUMNS):
            if _scale(module.COLUMNS[i]) != 100.0:
                continue  # scores (percent, higher is better) are ranked; a loss or other unit is not
            theirs = ""
            if report:
                theirs = " > ".join(sorted(report, key=lambda a: -report[a][i]))
            by_extra = f" (by {extra[i][1]}: {ranking(summary, extra[i][0])})" if len(extra) == len(module.COLUMNS) \
                else ""
            lines.append(f"- {title}: {ranking(summary, key)}{by_extra}" + (f"; report: {theirs}" if report else ""))
    return "\n".join(lines) + "\n"


def curves(name: str, workdir: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel: {arm: (steps, loss averaged over seeds)}} from the runs' per-modality loss sums and counts."""
    module = importlib.import_module(f"experiments.{name}")
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for panel, (sum_key, count_key) in module.CURVES.items():
        out[panel] = {}
        for arm in module.ARMS:
            per_step: dict[int, list[float]] = {}
            arm_dir = os.path.join(workdir, arm)
            for d in sorted(os.listdir(arm_dir)) if os.path.isdir(arm_dir) else []:
                for r in read_records(os.path.join(arm_dir, d)):
                    if count_key is None and sum_key in r:
                        per_step.setdefault(r["step"], []).append(r[sum_key])
                    elif count_key is not None and r.get(count_key):
                        per_step.setdefault(r["step"], []).append(r[sum_key] / r[count_key])
            steps = sorted(per_step)
            if steps:
                out[panel][arm] = (steps, [sum(per_step[s]) / len(per_step[s]) for s in steps])
    return out


def plot_curves(data: dict[str, dict[str, tuple[list[int], list[float]]]], path: str | None = None):
    """One panel per modality, one line per arm; saved to `path` when given. Returns the figure."""
    import matplotlib.pyplot as plt  # headless hosts get the Agg backend by default; notebooks keep theirs

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.6), squeeze=False)
    for ax, (panel, arms) in zip(axes[0], data.items()):
        for arm, (steps, losses) in arms.items():
            ax.plot(steps, losses, label=arm)
        ax.set_title(f"{panel} loss (train batches)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy per loss token")
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_outputs(name: str, workdir: str) -> dict[str, Any]:
    """table.json, table.md (with the module's own `table_notes(workdir)` markdown after it, if it has one) and
    curves.png."""
    summary = summarize(name, workdir)
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(summary, f, indent=1)
    notes = getattr(importlib.import_module(f"experiments.{name}"), "table_notes", None)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table_markdown(name, summary))
        if notes is not None and summary:
            f.write("\n" + notes(workdir))
    import matplotlib.pyplot as plt

    plt.close(plot_curves(curves(name, workdir), os.path.join(workdir, "curves.png")))  # saved, not shown
    return summary


def define_flags() -> None:
    """The command line's flags, defined only when this file runs as a program: experiment modules import it for
    its helpers inside other programs (`experiments.run`), whose flags would clash with these."""
    flags.DEFINE_integer("seeds", 3, "Seeds per arm (0 .. seeds-1).")
    flags.DEFINE_string("workdir", None, "Ablation directory: one run per DIR/ARM/seed_S, the table and plots.")
    flags.DEFINE_string("variant", "", "Appended to each arm's config ARG (e.g. 'smoke').")
    flags.DEFINE_multi_string("set", [], "FIELD=VALUE config overrides passed to every run (--config.FIELD).")
    flags.DEFINE_list("arms", [], "Only these arms (default: all of the module's ARMS).")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m experiments.ablate NAME --seeds N --workdir DIR")
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    name = argv[1]
    run_all(name, f.seeds, f.workdir, f.variant, tuple(f.set), tuple(f.arms))
    write_outputs(name, f.workdir)
    with open(os.path.join(f.workdir, "table.md")) as table:
        print(table.read())


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
