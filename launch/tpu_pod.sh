#!/usr/bin/env bash
# A TPU pod slice: run the same command on every host (jax.distributed detects the slice itself), e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd k25 && launch/tpu_pod.sh \
#     --config=experiments/k2_full.py --workdir=gs://BUCKET/run --config.mesh.pp=16 --config.mesh.ep=16 --config.mesh.dp=2"
set -euo pipefail
exec python -m experiments.run --config.distributed=True "$@"
