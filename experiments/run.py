"""The one entry point: `python -m experiments.run --config=experiments/NAME.py[:ARG] --workdir=DIR`.

Rerunning with the same DIR resumes from its last checkpoint. `--dry_run` builds the run abstractly
(no weights allocated), lowers one training step and writes DIR/plan.json.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build abstractly, lower one step, print the plan; no training.")
_COMPILE = flags.DEFINE_bool("compile", False, "With --dry_run: also compile and report memory analysis.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs; "
                                   "TPU pods and SLURM are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def setup_logging(workdir: str) -> str:
    """Every log record goes to DIR/log.txt; the console shows warnings and errors only, unless --verbosity
    (absl's own flag) was given, so the progress bar and the tables are not buried in library INFO lines."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "log.txt")
    handler = std_logging.FileHandler(path)
    handler.setFormatter(logging.PythonFormatter())
    handler.setLevel(std_logging.DEBUG)
    std_logging.getLogger().addHandler(handler)
    if not flags.FLAGS["verbosity"].present:
        logging.get_absl_handler().setLevel(std_logging.WARNING)
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields are set as --config.FIELD=VALUE")
    # Checked here rather than with flags.mark_flags_as_required, whose validator sits on the process-wide FLAGS
    # and fails every other absl entry point imported into the same process.
    missing = [f"--{name}" for name, value in (("config", _CONFIG.value), ("workdir", _WORKDIR.value)) if not value]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} required: --config=experiments/NAME.py[:ARG] --workdir=DIR.")
    setup_logging(_WORKDIR.value)
    import jax

    from k25.train import loop

    config = _CONFIG.value
    if config.get("distributed", False) or _NUM_PROCESSES.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    logging.info("devices: %s", jax.devices())
    if _DRY_RUN.value:
        print(json.dumps(loop.plan(config, _WORKDIR.value, compile=_COMPILE.value), indent=1))
        return
    result = loop.train(config, _WORKDIR.value, announce=print)
    if result["eval"]:
        print(format_eval_table(result["eval"]))


def format_eval_table(metrics: dict) -> str:
    """Held-out metrics at the end, next to the untrained model's when it was evaluated."""
    final = {k.removeprefix("eval/"): v for k, v in sorted(metrics.items()) if not k.endswith("@init")}
    init = {k.removeprefix("eval/").removesuffix("@init"): v for k, v in metrics.items() if k.endswith("@init")}
    names = list(final) or sorted(init)  # evaluation-only runs (no steps) have only the step-0 metrics
    width = max(len(k) for k in names)
    lines = [f"{'held-out metric'.ljust(width)}  untrained  trained", "-" * (width + 20)]
    for name in names:
        before = f"{init[name]:.3f}" if name in init else "-"
        after = f"{final[name]:.3f}" if name in final else "-"
        lines.append(f"{name.ljust(width)}  {before:>9}  {after:>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(app.run(main))
