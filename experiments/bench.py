"""Benchmarks: `python -m experiments.bench NAME [--flags]` prints one JSON object of measured figures.

Times are medians over repeats; every ratio is against a baseline measured in the same run.
Each benchmark lives in `experiments/benchmarks/NAME.py` and exposes `run(argv) -> dict`.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import experiments.benchmarks as benchmarks


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> None:
    names = available()
    if len(argv) < 2 or argv[1] not in names:
        sys.exit(f"usage: python -m experiments.bench NAME [args]; NAME is one of {names}")
    module = importlib.import_module(f"experiments.benchmarks.{argv[1]}")
    print(json.dumps(module.run(argv[2:]), indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv)
