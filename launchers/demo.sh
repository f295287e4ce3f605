#!/usr/bin/env bash
# The main job (`make demo`): the CHERRY recipe at the tiny preset on the shipped corpus
# (recipes/cherry-tiny.yaml: dense with SGT at TP=2 -> depth compression -> uptraining distilled from the
# dense model -> Korean and English+code branches -> MoEE of the two at EP=2 with MTP -> every model
# evaluated), then its stage table. About 10 minutes on 2 CPU cores (10:20 measured).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/demo}
rm -rf "$RUN_DIR"  # the demo always starts fresh; a real run re-uses its run dir, and finished stages are skipped
mkdir -p "$RUN_DIR"
start=$(date +%s)
# Every stage's own output goes to $RUN_DIR/<stage>.log; the runner prints one line per command.
OMP_NUM_THREADS=1 .venv/bin/python -m cherry_megatron.recipe run --recipe recipes/cherry-tiny.yaml \
  --run-dir "$RUN_DIR" "$@" > "$RUN_DIR/result.json"
echo
sed -n '/^| stage/,/^$/p' "$RUN_DIR/report.md"
echo "recipe finished in $(( $(date +%s) - start )) s: the stage table is $RUN_DIR/report.md (curves: $RUN_DIR/report.png),"
echo "every stage's log $RUN_DIR/<stage>.log; run it again with:"
echo "  .venv/bin/python -m cherry_megatron.recipe run --recipe recipes/cherry-tiny.yaml --run-dir $RUN_DIR"
