#!/usr/bin/env bash
# The accelerator figures BUILD_NOTES still lacks, in one run on a GPU or TPU host whose jax has its accelerator
# plugin: train-step MFU of moe_25m and of the ~1B-active MoE against the chip's dense bf16 peak (with the
# allocator's peak bytes), then the ragged expert exchange's primitive against its reference (needs >= 2 chips;
# skipped, and said so, on one).
#   launch/device_checks.sh OUT_DIR        (PYTHON overrides the interpreter; extra flags go to the train bench)
set -euo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
py=${PYTHON:-python}
"$py" -c 'import sys, jax; d = jax.devices(); print(len(d), "x", d[0].device_kind)
if d[0].platform == "cpu": sys.exit("device_checks: jax sees no accelerator (install jax with its GPU/TPU plugin); the CPU figures come from python -m experiments.bench train")'
"$py" -m experiments.bench train --configs=moe_25m,moe_1b --dtype=bfloat16 "$@" | tee "$out/bench_train.json"
# tests/conftest.py defaults JAX_PLATFORMS to cpu; an empty value lets jax pick the accelerator
JAX_PLATFORMS= "$py" -m pytest -q -p no:xdist -rs tests/parallel/test_expert_ragged.py -k reference_equals_the_primitive \
  | tee "$out/ragged_primitive.txt"
