#!/usr/bin/env bash
# The main job (`make demo`): the tiny preset, tensor-parallel over 2 CPU processes (TP=2), on the
# shipped Korean corpus; then an independent held-out evaluation and a short summary.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/demo}
STEPS=${STEPS:-150}
rm -rf "$RUN_DIR"  # the demo always starts fresh; a real run re-uses its run dir to resume
OMP_NUM_THREADS=1 NPROC=2 launchers/torchrun.sh --config tiny --run-dir "$RUN_DIR" \
  --set parallel.tp=2 train.steps="$STEPS" train.eval_interval=50 train.log_interval=10
.venv/bin/python -m cherry_megatron.evaluate --load "$RUN_DIR" --data data/tokens/heldout_text_document \
  | tee "$RUN_DIR/final_eval.json"
.venv/bin/python tools/summarize_run.py "$RUN_DIR"
