"""What the experiment tools share: run the real trainer for a named run, resumably."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cherry_megatron.distributed import child_env
from cherry_megatron.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def run(name: str, run_dir: Path, config: str, steps: int, sets: list[str]) -> list[dict]:
    """Train `run_dir` to `steps` steps (skipped when its final eval is logged; resumed when interrupted)."""
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if any(r.get("eval_loss") is not None and r["step"] == steps for r in rows):
        print(f"[{name}] done already", flush=True)
        return rows
    print(f"[{name}] training {steps} steps -> {run_dir}", flush=True)
    cmd = [sys.executable, "-m", "cherry_megatron.train", "--config", config, "--run-dir", str(run_dir),
           "--set", f"train.steps={steps}", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"[{name}] failed:\n{proc.stderr[-3000:]}")
    return read_metrics(run_dir)
