"""`train.compile=true` (torch.compile per block) against eager: the trainer's step time, same run otherwise.

    .venv/bin/python bench/compile_step.py [--config tiny] [--steps 10] [--warmup 4] [--set key=value ...]

Both sides are `cherry_megatron.train` in a child process (bench/runs.py), eager first, then compiled, then
eager again; each side's median step time after `--warmup` steps (which include the compilation) is quoted.
The first step's time of the compiled run is the compilation's cost. The last line is one JSON object;
`speedup` > 1 means compiled steps are faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.runs import trainer_step_times  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args()
    eager = trainer_step_times(args.config, args.overrides + ["train.compile=false"], args.steps // 2, args.warmup)
    first = trainer_step_times(args.config, args.overrides + ["train.compile=true"], args.steps + args.warmup, 0)
    compiled = first[args.warmup:]
    eager += trainer_step_times(args.config, args.overrides + ["train.compile=false"], args.steps - args.steps // 2,
                                args.warmup)
    res = {"config": args.config, "overrides": args.overrides, "eager_step_s": round(statistics.median(eager), 4),
           "compiled_step_s": round(statistics.median(compiled), 4), "first_compiled_step_s": round(first[0], 2)}
    res["speedup"] = round(res["eager_step_s"] / res["compiled_step_s"], 3)
    print(f"eager {res['eager_step_s']:.4f} s/step, compiled {res['compiled_step_s']:.4f} s/step "
          f"(first step {res['first_compiled_step_s']:.1f} s): {res['speedup']:.2f}x", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
