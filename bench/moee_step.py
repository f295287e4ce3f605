"""MoEE training step time against the single expert's, with active parameters accounted.

    .venv/bin/python bench/moee_step.py [--config recurrent-tiny] [--experts 2] [--steps 8] [--set key=value ...]

Variants, each a real trainer run (child process, one process) on the shipped corpus, medians after
warm-up: the single expert (the compressed recurrent model), the MoEE of --experts copies of its shape
with top-1 routing (no token dropped: each expert's buffer is as long as the busiest expert's load), top-1
with capacity factor 1 (tokens beyond N/E per expert dropped), top-2, and top-1 with one MTP module.
A top-1 MoEE passes each token through as many weights as one expert (plus a router), so its ideal step
time is the expert's; the ratio shows what routing costs on top: gate, dispatch, combine, and the
padding of the expert buffers when routing is unbalanced. CPU figures on this machine.
Last line: JSON; `ratio_step_time_top1_over_expert` and the time per active parameter against the expert.
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
    p.add_argument("--config", default="recurrent-tiny")
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args()
    from cherry_megatron.config import load_config
    from cherry_megatron.model import parameter_count

    e = args.experts
    variants = {"expert": [], "top1": [f"moee.num_experts={e}"],
                "top1_capacity1": [f"moee.num_experts={e}", "moee.capacity_factor=1.0"],
                "top2": [f"moee.num_experts={e}", "moee.top_k=2"], "top1_mtp1": [f"moee.num_experts={e}", "moee.mtp_depth=1"]}
    res = {"config": args.config, "experts": e, "device": "cpu"}
    for name, extra in variants.items():
        sets = [*args.overrides, *extra]
        counts = parameter_count(load_config(args.config, sets + ["model.vocab_size=8192"]))
        t = statistics.median(trainer_step_times(args.config, sets, args.steps, args.warmup))
        res[name] = {"step_s": round(t, 4), "params_total": counts["total"], "params_active": counts["active"]}
        print(f"{name:>10}: median step {t:.3f} s | {counts['total']:,} parameters, {counts['active']:,} active "
              "per token", flush=True)
    base = res["expert"]
    for name in ("top1", "top1_capacity1", "top2", "top1_mtp1"):
        v = res[name]
        res[f"ratio_step_time_{name}_over_expert"] = round(v["step_s"] / base["step_s"], 3)
        res[f"ratio_step_time_per_active_param_{name}_over_expert"] = round(
            (v["step_s"] / v["params_active"]) / (base["step_s"] / base["params_active"]), 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
