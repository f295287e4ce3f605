"""Print a short summary of a run directory: held-out loss before/after, throughput, where the logs are."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cherry_megatron.metrics import read_metrics  # noqa: E402


def main(run_dir: str) -> None:
    rows = read_metrics(Path(run_dir))
    evals = [r for r in rows if r.get("eval_loss") is not None]
    train = [r for r in rows if r.get("loss") is not None]
    tps = statistics.median(r["tokens_per_s"] for r in train)
    mfu = statistics.median(r["mfu"] for r in train if r.get("mfu") is not None)
    print(f"\n== run {run_dir}: {train[-1]['step']} steps, {train[-1]['consumed_tokens']:,} tokens")
    print(f"held-out loss: {evals[0]['eval_loss']:.3f} at step {evals[0]['step']} -> "
          f"{evals[-1]['eval_loss']:.3f} at step {evals[-1]['step']}")
    print(f"train loss (last log): {train[-1]['loss']:.3f}; throughput: {tps:,.0f} tokens/s, MFU {mfu:.1%} (median)")
    final = Path(run_dir) / "final_eval.json"
    if final.is_file():
        import json

        e = json.loads(final.read_text())
        print(f"final checkpoint, whole held-out split (cherry_megatron.evaluate): loss {e['loss']:.3f}, "
              f"ppl {e['ppl']:.1f} over {e['tokens']:,} tokens")
    print(f"metrics: {run_dir}/metrics.jsonl   tensorboard: tensorboard --logdir {run_dir}/tensorboard")
    print(f"checkpoints: {run_dir}/checkpoints (resume by re-running with the same --run-dir)")


if __name__ == "__main__":
    main(sys.argv[1])
