"""Fuse compressed checkpoints into a MoEE checkpoint the trainer loads (cherry_megatron/fuse/moee.py).

    cherry-build-moee --experts CKPT [CKPT ...] --output DIR [--top-k k] [--router-init random|zeros]
        [--seed N] [--eval-data PREFIX] [--eval-tokens N]

Each CKPT is a run dir, DeepSpeed checkpoint or consolidated dir of a recurrent (or dense) model, at any
TP degree; all share one shape. DIR receives model.safetensors, cherry_config.json and config.yaml;
train it with
    python -m cherry_megatron.train --config DIR/config.yaml --run-dir RUN [--set moee.mtp_depth=1 ...]
The config is expert 0's (its data and training settings included): set what the MoEE run should
differ in with --set. Prints the parameter table (stored vs active per token) and, with held-out data, each expert's
held-out loss and the fused model's right after fusion.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cherry_megatron.errors import cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", nargs="+", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--router-init", default="random")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-data", default="", help="held-out prefix; default: the first expert's data.eval_path")
    p.add_argument("--eval-tokens", type=int, default=16384, help="0: the whole file")
    args = p.parse_args(argv)
    with cli_errors():
        from cherry_megatron.checkpoint.consolidate import save_consolidated
        from cherry_megatron.convert.load import load_consolidated
        from cherry_megatron.evaluate import heldout_losses
        from cherry_megatron.config import from_dict, to_yaml
        from cherry_megatron.errors import CheckpointError
        from cherry_megatron.fuse.moee import fuse
        from cherry_megatron.model import parameter_count

        out = Path(args.output)
        if out.exists():
            raise CheckpointError(f"{args.output} exists already; choose a new --output")
        loaded = [load_consolidated(c) for c in args.experts]
        cfgs = [from_dict(d) for _, d in loaded]
        state, cfg = fuse([s for s, _ in loaded], cfgs, args.top_k, args.router_init, args.seed)
        save_consolidated(out, state, cfg.to_dict())
        cfg.model.init_from = str(out)
        (out / "config.yaml").write_text(to_yaml(cfg))
        one, fused = parameter_count(cfgs[0]), parameter_count(cfg)
        print(f"{'':28}{'one expert':>14}{'MoEE':>14}")
        rows = (("MLPs of one expert", fused["per_expert"], fused["per_expert"]),
                ("MLPs of all experts", fused["per_expert"], fused["experts"]), ("routers", 0, fused["router"]),
                ("total stored", one["total"], fused["total"]), ("active per token", one["active"], fused["active"]))
        for label, a, b in rows:
            print(f"{label:28}{a:>14,}{b:>14,}")
        result = {"output": str(out), "experts": len(loaded), "top_k": args.top_k, "router_init": args.router_init,
                  "params_expert": one["total"], "params_total": fused["total"], "params_active": fused["active"]}
        data = args.eval_data or cfgs[0].data.eval_path
        if data:
            *result["heldout_loss_experts"], result["heldout_loss_moee"] = heldout_losses(
                [(c, s) for c, (s, _) in zip(cfgs, loaded)] + [(cfg, state)], data, args.eval_tokens)
            print("held-out loss: experts " + ", ".join(f"{x:.4f}" for x in result["heldout_loss_experts"]) +
                  f"; MoEE right after fusion {result['heldout_loss_moee']:.4f}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
