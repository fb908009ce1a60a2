"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np


def to_python(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item()
    return a.tolist()


class MetricsWriter:
    """Appends to DIR/metrics.jsonl and writes scalars to TensorBoard under DIR/tb/."""

    def __init__(self, workdir: str, enable_tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._f = open(self.path, "a")
        self._tb = None
        if enable_tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(out: str, run_dirs: list[str], keys: tuple[str, ...], *, xlabel: str = "step",
              figsize: tuple[float, float] = (13, 7)) -> None:
    """One panel per metric key (2 x ceil(n/2)), one line per run directory, from each run's metrics.jsonl; a
    run keeps its colour in every panel, also where another run lacks the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=figsize)
    for i, d in enumerate(run_dirs):
        rows = read_metrics(d)
        for ax, k in zip(axes.flat, keys):
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=f"C{i % 10}", label=os.path.basename(os.path.normpath(d)))
    for ax, k in zip(axes.flat, keys):
        ax.set_title(k)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_cli(prog: str, plot: Callable[[str, list[str]], None], argv: list[str] | None = None) -> None:
    """The `python -m PROG plot OUT.png RUN_DIR...` entry point of an experiment config that draws its runs."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "plot":
        plot(argv[1], argv[2:])
    else:
        sys.exit(f"usage: python -m {prog} plot OUT.png RUN_DIR [RUN_DIR ...]")
