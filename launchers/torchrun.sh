#!/usr/bin/env bash
# Launch the trainer with torchrun on one node or several (clusters without SLURM).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NPROC=8 launchers/torchrun.sh --config dense-1b-48l --run-dir runs/1b
# One process per GPU (or, on CPU nodes, per core group: set NPROC and OMP_NUM_THREADS so NPROC x threads <= cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m cherry_megatron.train "$@"
fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --nproc_per_node "$NPROC" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
  -m cherry_megatron.train "$@"
