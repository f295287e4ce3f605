"""SGT's saving in the output layer: training step time with full supervision and with sgt.ratio=0.15.

    .venv/bin/python bench/sgt_head.py [--config tiny] [--vocab 32768] [--steps 8] [--set key=value ...]

With SGT the model gathers the selected positions' hidden states before the LM head, so the head's
matmuls and the vocab-parallel cross-entropy run on ~15% of the positions. A 32k vocabulary makes the
head a large share of a small model's step, as it is for the 1B preset's 45k vocabulary. Each variant
is a real trainer run (child process) on the shipped corpus; medians after warm-up. CPU figures here.
`poisson` draws a varying count per sequence; its gathered head is padded to a fixed bucket (mean + 6 sd), so
its steps cost the same every time, a little more than `top`'s exact count; `conditional` draws the exact count
(its sampler's sequential loops are the extra cost).
Last line: JSON; `ratio_step_time_sgt_over_full` < 1 means SGT steps are faster (target <= 0.8).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.runs import trainer_step_times  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args()
    base = [f"model.vocab_size={args.vocab}", *args.overrides]
    sgt = ["sgt.ratio=0.15"]
    variants = {"full": [], "sgt15_random": sgt + ["sgt.policy=random"], "sgt15_loss": sgt + ["sgt.policy=loss"],
                "sgt15_random_poisson": sgt + ["sgt.policy=random", "sgt.sampling=poisson"],
                "sgt15_frequency_poisson": sgt + ["sgt.policy=frequency", "sgt.sampling=poisson"],
                "sgt15_frequency_conditional": sgt + ["sgt.policy=frequency", "sgt.sampling=conditional"]}
    res = {"config": args.config, "vocab_size": args.vocab, "device": "cpu"}
    for name, extra in variants.items():
        t = statistics.median(trainer_step_times(args.config, base + extra, args.steps, args.warmup))
        res[f"{name}_step_s"] = round(t, 4)
        print(f"{name:>27}: median step {t:.3f} s", flush=True)
    res["ratio_step_time_sgt_over_full"] = round(res["sgt15_random_step_s"] / res["full_step_s"], 3)
    for name in variants:
        if name not in ("full", "sgt15_random"):
            res[f"ratio_step_time_{name}_over_full"] = round(res[f"{name}_step_s"] / res["full_step_s"], 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
