"""Long-context mid-training with YaRN (report §4.3, Table 3's third stage: 32k -> 256k) in miniature: L -> 8L.

    python -m experiments.long_context --workdir=/tmp/long_context [--smoke]      # every phase, then the figures
    python -m experiments.run --config=experiments/long_context.py:base --workdir=/tmp/long_context/base
    python -m experiments.run --config=experiments/long_context.py:yarn_2x --workdir=/tmp/long_context/yarn_2x \
        --config.init_from=/tmp/long_context/base                                  # (and so on, one phase each)
ARG picks the phase: "base" trains the tiny K2 from scratch on passkey documents of up to L = 128 tokens with
plain RoPE; "yarn_2x", "yarn_4x", "yarn_8x" switch the rope to YaRN (factor 8 over the original L) and
continue on documents of up to 2L, 4L, 8L tokens, each from the previous phase's weights (the sequence length
raised in steps). Append ",smoke" for a few-step run (tests). Every phase's final eval logs
eval/retrieval_at_<n> (single-needle passkey accuracy, mean over depths), per-depth cells and
eval/multikey_at_<n> for n = L, 2L, 4L, 8L, so the base phase's eval is the no-extension baseline.
The driver (`python -m experiments.long_context`) runs the phases in order (finished ones are skipped),
also scores the base weights under YaRN without any mid-training, and writes DIR/retrieval.{json,md} and
DIR/retrieval_heatmaps.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import ml_collections
from absl import app, flags

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.model.config import RopeScaling, tiny
from k25.train.retrieval_eval import default_retrieval_eval_config

L = 128  # the base context length; the target is 8L
PHASES = ("base", "yarn_2x", "yarn_4x", "yarn_8x")
MULTIPLE = {"base": 1, "yarn_2x": 2, "yarn_4x": 4, "yarn_8x": 8}
STEPS = {"base": 1500, "yarn_2x": 100, "yarn_4x": 100, "yarn_8x": 100}
TOKENS_PER_STEP = 16 * L  # every phase trains on the same number of tokens per step


def yarn(factor: float = 8.0) -> RopeScaling:
    """YaRN over the base length, with DeepSeek-V3 / K2's mscale settings."""
    return RopeScaling(type="yarn", factor=factor, original_max_position_embeddings=L, mscale=1.0,
                       mscale_all_dim=1.0)


def model(phase: str) -> ml_collections.ConfigDict:
    rope = RopeScaling() if phase == "base" else yarn()
    return model_config_dict(tiny(vocab_size=264, hidden_size=128, num_hidden_layers=2, rope_scaling=rope,
                                  max_position_embeddings=8 * L, attention_chunk=2 * L))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "base").split(",") if p]
    phase, smoke = parts[0], parts[1:] == ["smoke"]
    if phase not in PHASES or parts[1:] not in ([], ["smoke"]):
        raise ValueError(f"long_context: ARG {arg!r} must be one of {PHASES}, optionally followed by ',smoke'.")
    c = base_config()
    c.phase = phase
    c.model = model(phase)
    c.seq_len = MULTIPLE[phase] * L
    c.batch_size = TOKENS_PER_STEP // c.seq_len
    c.data = default_data_config()
    c.data.tokenizer = "byte"
    c.data.sources = {"retrieval": 1.0}
    # the loss is on the answer (the key's digits and eos) only: with every token trained on, the 2-layer base
    # learned the filler and never the retrieval (0.00 at L after 1,500 steps); answer-only: 1.00 at L by step 1,000
    c.data.loss_on = "answer"
    c.data.synthetic = ml_collections.ConfigDict({"retrieval": dict(seed=0, min_len=48, max_len=c.seq_len,
                                                                    max_keys=3)})
    c.data.shuffle_window = 0  # synthetic records are drawn at random already
    c.retrieval_eval = default_retrieval_eval_config()
    c.retrieval_eval.lengths = [L * m for m in (1, 2, 4, 8)]
    c.init_from = ""  # the previous phase's workdir (the driver sets it)
    c.total_steps = STEPS[phase]
    c.log_every = 25
    c.eval_every = 300 if phase == "base" else 0  # and at the end of each phase
    c.eval_examples = 16  # greedy exact match on held-out training-length documents (eval/retrieval_exact)
    c.eval_max_new_tokens = 6
    c.checkpoint_every = 500
    c.progress_bar = False
    c.optim.lr = 3e-3 if phase == "base" else 1e-3
    c.optim.warmup_steps = 50 if phase == "base" else 10
    if smoke:
        c.total_steps, c.log_every, c.checkpoint_every = 3, 1, 3
        c.eval_examples = 2
        c.retrieval_eval.per_cell, c.retrieval_eval.depths, c.retrieval_eval.batch = 1, [0.0, 1.0], 2
        c.optim.warmup_steps = 1
        c.async_checkpoints = False
    return c


# ---------------------------------------------------------------------------------------------- the driver
def read_final(path: str) -> dict[str, Any] | None:
    """The final metrics record of a finished phase (its total_steps reached, the evals logged), else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            total = json.load(f)["total_steps"]
        with open(os.path.join(path, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return None
    done = [r for r in records if r["step"] == total and f"eval/retrieval_at_{L}" in r]
    return done[-1] if done else None


def run_phases(workdir: str, smoke: bool = False, overrides: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Runs every unfinished phase in order, each from the previous one's weights; {phase: final record}."""
    finals, previous = {}, ""
    for phase in PHASES:
        path = os.path.join(workdir, phase)
        if read_final(path) is None:
            arg = f"{phase},smoke" if smoke else phase
            cmd = [sys.executable, "-m", "experiments.run", f"--config=experiments/long_context.py:{arg}",
                   f"--workdir={path}", *(f"--config.{o}" for o in overrides)]
            if previous:
                cmd.append(f"--config.init_from={previous}")
            print(f"[long_context] {phase}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
        finals[phase] = read_final(path)
        previous = path
    return finals


def apply_overrides(c: ml_collections.ConfigDict, overrides: tuple[str, ...]) -> ml_collections.ConfigDict:
    """`FIELD=VALUE` strings (as passed to the runs as --config.FIELD=VALUE) applied to `c`, typed like the field."""
    for o in overrides:
        key, value = o.split("=", 1)
        current = c
        for part in key.split("."):
            current = current[part]
        typed = value == "True" if isinstance(current, bool) else type(current)(value)
        c.update_from_flattened_dict({key: typed})
    return c


def yarn_without_training(workdir: str, smoke: bool = False, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The base phase's weights under YaRN (factor 8) with no mid-training: the retrieval evals only."""
    from flax import nnx

    from k25.train.pretrain import TextLMStage

    c = apply_overrides(get_config("yarn_2x,smoke" if smoke else "yarn_2x"), overrides)
    c.init_from = os.path.join(workdir, "base")
    stage = TextLMStage(c)
    return stage.retrieval(stage.build_model(nnx.Rngs(0)))


def summarize(finals: dict[str, dict[str, Any]], yarn_only: dict[str, Any]) -> dict[str, Any]:
    """{row: {"retrieval": {n: acc}, "multikey": {n: acc}, "depths": {n: {pct: acc}}}} in driver order."""
    rows = {"base (no extension)": finals["base"], "base + YaRN, no mid-training": yarn_only,
            **{f"{p} (YaRN + mid-training)": finals[p] for p in PHASES[1:]}}
    out: dict[str, Any] = {}
    for name, rec in rows.items():
        lengths = sorted(int(k.split("_at_")[1]) for k in rec if k.startswith("eval/retrieval_at_") and "/" not in
                         k.split("_at_")[1])
        out[name] = {
            "retrieval": {n: rec[f"eval/retrieval_at_{n}"] for n in lengths},
            "multikey": {n: rec[f"eval/multikey_at_{n}"] for n in lengths},
            "depths": {n: {k.rsplit("depth_", 1)[1]: v for k, v in rec.items()
                           if k.startswith(f"eval/retrieval_at_{n}/depth_")} for n in lengths},
        }
    return out


def table_markdown(summary: dict[str, Any]) -> str:
    lengths = next(iter(summary.values()))["retrieval"].keys()
    head = "| model | " + " | ".join(f"passkey @{n}" for n in lengths) + " | " + \
        " | ".join(f"multi-key @{n}" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(lengths))]
    for name, row in summary.items():
        cells = [f"{row['retrieval'][n]:.2f}" for n in lengths] + [f"{row['multikey'][n]:.2f}" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmaps(summary: dict[str, Any], path: str | None = None):
    """Depth x length passkey accuracy, one panel per model; saved to `path` when given."""
    import matplotlib.pyplot as plt  # headless hosts get the Agg backend by default; notebooks keep theirs
    import numpy as np

    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 3.2), squeeze=False)
    for i, (ax, (name, row)) in enumerate(zip(axes[0], summary.items())):
        lengths = list(row["depths"])
        depths = sorted(row["depths"][lengths[0]], key=int)
        grid = np.asarray([[row["depths"][n][d] for n in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths] if i == 0 else [])  # shared by the row
        ax.set_xlabel("context length (tokens)")
        if i == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="passkey accuracy")
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    if not args.workdir:
        raise app.UsageError("--workdir is required")
    workdir, overrides = args.workdir, tuple(args.set)
    finals = run_phases(workdir, args.smoke, overrides)
    summary = summarize(finals, yarn_without_training(workdir, args.smoke, overrides))
    with open(os.path.join(workdir, "retrieval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(workdir, "retrieval.md"), "w") as f:
        f.write(table_markdown(summary))
    plot_heatmaps(summary, os.path.join(workdir, "retrieval_heatmaps.png"))
    print(table_markdown(summary))


if __name__ == "__main__":  # the flags exist only for the driver: experiments.run loads this file as a config
    flags.DEFINE_string("workdir", None, "Directory of the phases (DIR/<phase>) and the figures.")
    flags.DEFINE_bool("smoke", False, "Few-step phases with tiny evals (tests).")
    flags.DEFINE_multi_string("set", [], "FIELD=VALUE config overrides passed to every phase.")
    sys.exit(app.run(main))
