#!/usr/bin/env bash
# The deepspeed launcher: one node (NPROC ranks) or, with HOSTFILE, every node of a hostfile
# (see launch/hostfile.example; nodes reached by ssh). ZeRO-3 by default.
#
#   NPROC=8 bash launch/deepspeed.sh --config configs/opt-13b/sst2_mezo.yaml --out runs/opt13b-sst2
#   HOSTFILE=launch/hostfile bash launch/deepspeed.sh --config ... --out ... deepspeed_config=configs/deepspeed/zero3_offload.json
#
# Knobs: NPROC (one node; default: the GPUs nvidia-smi lists, else 2), HOSTFILE, MASTER_PORT (29500),
# OMP_NUM_THREADS (default 1 per rank). Arguments go to `zoscale train`; a later backend=... wins.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
else
  if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC:-0}" -gt 0 ] || NPROC=2
  fi
  where=(--num_gpus "$NPROC")  # on a machine without GPUs the deepspeed launcher starts CPU ranks
fi
exec python -m deepspeed.launcher.runner "${where[@]}" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module zoscale train backend=deepspeed "$@"
