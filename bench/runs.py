"""Run the real trainer for a few steps (in a child process, as a user would) and read its step times."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trainer_step_times(config: str, overrides: list[str], steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step of `python -m cherry_megatron.train`, after `warmup` steps."""
    sys.path.insert(0, str(ROOT))
    from cherry_megatron.distributed import child_env
    from cherry_megatron.metrics import read_metrics

    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "cherry_megatron.train", "--config", config, "--run-dir", f"{d}/run", "--set",
               f"train.steps={warmup + steps}", "train.log_interval=1", f"train.eval_interval={10**9}",
               f"train.save_interval={10**9}", "data.eval_path=", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"trainer failed:\n{proc.stderr[-3000:]}")
        rows = [r for r in read_metrics(Path(d) / "run") if "step_time_s" in r]
    return [r["step_time_s"] for r in rows[warmup:]]
