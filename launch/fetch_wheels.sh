#!/usr/bin/env bash
# Wheels for launch/device_checks.sh on a host without network whose image already holds jax with its accelerator
# plugin (and flax's, orbax's and grain's own dependencies, torch, transformers and pytest): k25's pinned
# flax / optax / orbax-checkpoint / grain / chex / ml-collections (versions read from setup.py) and the two
# wheels grain needs beyond such an image, for the host's CPython (default 3.12) on x86-64 Linux.
#   launch/fetch_wheels.sh DIR [PYTHON_VERSION]
set -euo pipefail
dir=${1:?wheel directory}; pyver=${2:-3.12}
cd "$(dirname "$0")/.."
mapfile -t reqs < <(python3 - <<'PY'
import ast
tree = ast.parse(open("setup.py").read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
reqs = next(k.value for k in call.keywords if k.arg == "install_requires")
wanted = {"flax", "optax", "orbax-checkpoint", "grain", "chex", "ml-collections"}
for r in ast.literal_eval(reqs):
    name = r.split("=")[0].split(">")[0].split("<")[0].strip()
    if name in wanted:
        print(r)
print("array-record")
print("portpicker")
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" "${reqs[@]}"
ls "$dir"
