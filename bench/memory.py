"""Measured peak memory per rank against `cherry-plan`'s estimate, for several layouts of one preset.

    .venv/bin/python bench/memory.py [--config small] [--nproc 2] [--steps 3] [--set key=value ...]

Each layout is a real `cherry_megatron.train` run under torchrun (CPU, gloo, fp32 here), which logs
`peak_memory_gib` (the largest peak RSS over ranks) and `base_memory_gib` (that rank's RSS before the model
was built: interpreter, torch, DeepSpeed); the planner is asked for the same layout (`--precision` of the run,
the same `--set` overrides, `--json`). Measured = peak - base, with MALLOC_MMAP_THRESHOLD_=1048576 so that the
resident set follows what is live (glibc otherwise keeps freed blocks under 32 MiB; README, "the 1B preset"). The last line is one JSON object:
`{"layouts": [{"layout", "measured_gib", "plan_gib", "ratio_measured_over_plan"}, ...]}`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"zero1": ["parallel.zero_stage=1"], "zero3": ["parallel.zero_stage=3"],
           "zero3_ckpt": ["parallel.zero_stage=3", "train.activation_checkpointing=1"]}


def measure(config: str, sets: list[str], nproc: int, steps: int, run_dir: Path) -> dict:
    from cherry_megatron.distributed import child_env
    from cherry_megatron.metrics import read_metrics

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cherry_megatron.train", "--config", config, "--run-dir", str(run_dir), "--set",
           f"train.steps={steps}", "train.log_interval=1", f"train.eval_interval={10**9}",
           f"train.save_interval={10**9}", "data.eval_path=", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env({"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed ({' '.join(sets)}):\n{proc.stderr[-3000:]}")
    rows = [r for r in read_metrics(run_dir) if "peak_memory_gib" in r]
    return {"peak_gib": max(r["peak_memory_gib"] for r in rows), "base_gib": rows[-1]["base_memory_gib"],
            "step_s": rows[-1].get("step_time_s")}


def plan(config: str, sets: list[str], nproc: int) -> dict:
    from cherry_megatron.distributed import child_env

    cmd = [sys.executable, "-m", "cherry_megatron.cli.plan", "--config", config, "--nodes", "1", "--gpus-per-node",
           str(nproc), "--precision", "fp32", "--gpu-memory-gib", "1000", "--json", "--set", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"cherry-plan failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.layouts.split(","):
            sets = [*args.overrides, *LAYOUTS[name]]
            got = measure(args.config, sets, args.nproc, args.steps, Path(d) / name)
            want = plan(args.config, sets, args.nproc)
            zero = int(next(s for s in LAYOUTS[name] if s.startswith("parallel.zero_stage=")).split("=")[1])
            row = next(r for r in want["layouts"] if r["tp"] == 1 and r["pp"] == 1 and r["zero"] == zero)
            measured = got["peak_gib"] - got["base_gib"]
            out.append({"layout": name, "measured_gib": round(measured, 3), "plan_gib": round(row["total_gib"], 3),
                        "ratio_measured_over_plan": round(measured / row["total_gib"], 3),
                        "peak_gib": round(got["peak_gib"], 3), "base_gib": round(got["base_gib"], 3),
                        "plan_terms_gib": {k: round(row[k], 3) for k in row if k.endswith("_gib") and k != "total_gib"}})
            print(f"{name:>11}: measured {measured:.2f} GiB per rank (peak {got['peak_gib']:.2f} - base "
                  f"{got['base_gib']:.2f}), plan {row['total_gib']:.2f} GiB: {measured / row['total_gib']:.2f}x",
                  flush=True)
    print(json.dumps({"config": args.config, "nproc": args.nproc, "overrides": args.overrides, "layouts": out}))


if __name__ == "__main__":
    main()
