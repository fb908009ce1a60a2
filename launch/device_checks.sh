#!/usr/bin/env bash
# The accelerator figures BUILD_NOTES still lacks, in one run on a GPU or TPU host whose jax has its accelerator
# plugin: train-step MFU of moe_25m and of the ~1B-active MoE against the chip's dense bf16 peak, with the
# allocator's peak bytes next to XLA's compiled memory analysis of the same step (the method behind the K2
# layout's plan); moe_1b again with full recomputation; on a host with >= 8 chips, one pipeline stage of the K2
# layout at reduced depth (k2_stage: measured peak next to its compiled figure); then the ragged expert
# exchange's primitive against its reference (needs >= 2 chips; skipped, and said so, on one).
#   launch/device_checks.sh OUT_DIR        (PYTHON overrides the interpreter; extra flags go to the train bench)
# On a host without network whose image already holds jax with its plugin, torch and pytest, set WHEELS=DIR to a
# folder of the remaining wheels (launch/fetch_wheels.sh DIR, run where pip reaches an index): they are
# installed without dependencies into a temporary folder ahead of the image's packages, and this checkout is
# imported in place.
set -euo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # the checkout's root: experiments/ and tests/ are run from here
py=${PYTHON:-python}
# jax on a GPU takes 75% of the memory by default; moe_1b's compiled peak is 62.5 GB on XLA:CPU
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [[ -n "${WHEELS:-}" ]]; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c 'import sys, jax; d = jax.devices(); print(len(d), "x", d[0].device_kind, "jax", jax.__version__)
if d[0].platform == "cpu": sys.exit("device_checks: jax sees no accelerator (install jax with its GPU/TPU plugin); the CPU figures come from python -m experiments.bench train")'
bench=("$py" -m experiments.bench train --dtype=bfloat16 --compiled_memory)
"${bench[@]}" --configs=moe_25m,moe_1b "$@" | tee "$out/bench_train.json"
"${bench[@]}" --configs=moe_1b --big_remat=full "$@" | tee "$out/bench_train_full_remat.json"
if [[ $("$py" -c 'import jax; print(jax.device_count())') -ge 8 ]]; then
  "${bench[@]}" --configs=k2_stage --repeats=2 "$@" | tee "$out/bench_train_k2_stage.json"
else
  echo "k2_stage skipped: one K2 pipeline stage needs 8 devices (pp2 x dp2 x ep2)" | tee "$out/bench_train_k2_stage.txt"
fi
# tests/conftest.py defaults JAX_PLATFORMS to cpu; an empty value lets jax pick the accelerator
JAX_PLATFORMS= "$py" -m pytest -q -p no:xdist -p no:cacheprovider -rs tests/parallel/test_expert_ragged.py \
  -k reference_equals_the_primitive | tee "$out/ragged_primitive.txt"
