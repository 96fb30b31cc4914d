#!/usr/bin/env bash
# One node, NPROC ranks, parameters replicated on every rank (backend ddp): each rank evaluates its
# share of the global batch; only the losses cross the wire (a few scalars per step).
#
#   NPROC=8 bash launch/torchrun.sh --config configs/opt-13b/sst2_mezo.yaml --out runs/opt13b-sst2
#   NPROC=2 bash launch/torchrun.sh --out runs/quickstart-2ranks steps=2000     # CPU ranks over gloo
#   NPROC=8 bash launch/torchrun.sh --config ... --out ... backend=fsdp           # shard by rows (FSDP2)
#
# Knobs: NPROC (default: the GPUs nvidia-smi lists, else 2), OMP_NUM_THREADS (default 1 per rank).
# Everything after the script name goes to `zoscale train` (--config, --out, --resume, key=value).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# On SIGTERM the ranks checkpoint at the next step boundary; torchrun would kill them after 30 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}
exec python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m zoscale train backend=ddp "$@"  # a later backend=... wins
