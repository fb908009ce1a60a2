#!/usr/bin/env bash
# Wheels for launch/device_checks.sh on a host without network whose image already holds jax with its accelerator
# plugin (and flax's, orbax's and grain's own dependencies, torch, transformers and pytest): k25's flax / optax /
# orbax-checkpoint / grain / chex / ml-collections (versions read from setup.py) and the two wheels grain needs
# beyond such an image, for the host's CPython (default 3.12) on x86-64 Linux. A NAME==VERSION argument replaces
# that package's pin: a jax newer than setup.py's needs a flax that imports with it (jax 0.11.2: flax==0.12.12,
# tested; flax 0.12.8 fails at import there).
#   launch/fetch_wheels.sh DIR [PYTHON_VERSION [NAME==VERSION ...]]
set -euo pipefail
dir=${1:?wheel directory}; pyver=${2:-3.12}; shift $(($# < 2 ? $# : 2))
cd "$(dirname "$0")/.."
reqs_text=$(python3 - "$@" <<'PY'
import ast
import re
import sys

def name(req: str) -> str:
    return re.split(r"[=<>!~ ]", req, maxsplit=1)[0].lower()

tree = ast.parse(open("setup.py").read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
pins = {name(r): r for r in ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))}
wanted = ["flax", "optax", "orbax-checkpoint", "grain", "chex", "ml-collections"]
reqs = {n: pins[n] for n in wanted} | {"array-record": "array-record", "portpicker": "portpicker"}
for override in sys.argv[1:]:
    if name(override) not in reqs:
        sys.exit(f"fetch_wheels: {override!r} names none of {sorted(reqs)}")
    reqs[name(override)] = override
print("\n".join(reqs.values()))
PY
)
mapfile -t reqs <<< "$reqs_text"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" "${reqs[@]}"
ls "$dir"
