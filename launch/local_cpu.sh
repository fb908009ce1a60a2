#!/usr/bin/env bash
# N processes on this host (PYTHON overrides the interpreter), each with D fake CPU devices, joined by jax.distributed (gloo collectives).
#   launch/local_cpu.sh NPROC DEVICES_PER_PROC --config=experiments/tiny_lm.py --workdir=/tmp/run [--config.mesh.dp=...]
set -euo pipefail
nproc=${1:?number of processes}; ndev=${2:?devices per process}; shift 2
port=${K25_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${ndev}" JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" -m experiments.run --coordinator_address="localhost:${port}" --num_processes="${nproc}" \
    --process_id="${i}" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
