#!/usr/bin/env bash
# A refactor's check that behaviour did not change: `tiny` for 20 steps at TP=2 ZeRO-1 and at TP=2 x PP=2 from the
# code in SRC (a checkout, e.g. `git worktree add /tmp/base HEAD~1`), writing OUT/<layout>.losses (step, loss,
# grad norm, eval loss per line). Run it for the old and the new tree and `cmp` the files: they must be equal.
#   tools/identical_losses.sh /tmp/base /tmp/before && tools/identical_losses.sh . /tmp/after
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=$1; OUT=$2; PY=${PY:-$HERE/.venv/bin/python}
cd "$SRC"; [ -e data ] || ln -s "$HERE/data" data
rm -rf "$OUT"; mkdir -p "$OUT"
COMMON="train.steps=20 train.log_interval=1 train.eval_interval=10 train.save_interval=20 train.eval_tokens=4096"
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m cherry_megatron.train --config tiny \
  --run-dir "$OUT/tp2_zero1" --set parallel.tp=2 parallel.zero_stage=1 $COMMON > "$OUT/tp2.log" 2>&1
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node 4 -m cherry_megatron.train --config tiny \
  --run-dir "$OUT/tp2_pp2" --set parallel.tp=2 parallel.pp=2 parallel.zero_stage=1 $COMMON > "$OUT/tp2pp2.log" 2>&1
for r in tp2_zero1 tp2_pp2; do grep -E '"(loss|eval_loss)"' "$OUT/$r/metrics.jsonl" | python3 -c '
import json,sys
for l in sys.stdin:
    d=json.loads(l); print(d["step"], repr(d.get("loss")), repr(d.get("grad_norm")), repr(d.get("eval_loss")))' > "$OUT/$r.losses"; done
wc -l "$OUT"/*.losses
