"""The run or experiment config a capability task reads its held-out data from.

A task evaluates what a run held out, so it takes the run directory (its `config.json`, written by the training
loop) or, before any run exists, an experiment config `experiments/NAME.py[:ARG]` (the same spec
`experiments.run --config` takes).
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections


def load_config(source: str) -> ml_collections.ConfigDict:
    """`source` is a k25 run directory or `path/to/experiment.py[:ARG]`; a clear error for anything else."""
    if os.path.isdir(source):
        path = os.path.join(source, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{source} has no config.json; give a k25 run directory or an experiment "
                                    "config file (experiments/NAME.py[:ARG]).")
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    path, _, arg = source.partition(":")
    if not (path.endswith(".py") and os.path.exists(path)):
        raise FileNotFoundError(f"config={source!r} is neither a run directory nor an existing experiment config "
                                "file (experiments/NAME.py[:ARG]).")
    spec = importlib.util.spec_from_file_location("_k25_eval_experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)
