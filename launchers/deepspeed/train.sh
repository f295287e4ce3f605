#!/usr/bin/env bash
# Launch the trainer with DeepSpeed's launcher (clusters without SLURM).
#   Several hosts: HOSTFILE=launchers/deepspeed/hostfile launchers/deepspeed/train.sh --config dense-1b-48l --run-dir /shared/runs/1b
#   This host:     NPROC=8 launchers/deepspeed/train.sh --config dense-1b-48l --run-dir runs/1b
# The hostfile has one line per host, "<hostname> slots=<processes>" (see hostfile.example); DeepSpeed
# reaches every host with pdsh/ssh (passwordless; it checks even for localhost), so the repo and .venv
# must be at the same path on each. On CPU hosts keep processes x OMP_NUM_THREADS <= cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
if [ -n "${HOSTFILE:-}" ]; then
  hosts=(--hostfile "$HOSTFILE")
else
  hosts=(--num_gpus "${NPROC:-1}")  # on a CPU-only host DeepSpeed takes it as the number of processes
fi
exec "$PY" -m deepspeed.launcher.runner "${hosts[@]}" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module cherry_megatron.train "$@"  # LOCAL_RANK comes from the environment
