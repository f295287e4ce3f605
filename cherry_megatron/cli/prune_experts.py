"""Prune a routed model to fewer experts per layer for one task by merging them (UNCURL, arXiv 2409.01483).

    python tools/prune_experts.py --load CKPT --calib PREFIX --keep-experts D --output DIR
        [--method uncurl|frequency|frequency-merge] [--router mean|random] [--calib-tokens N] [--seq-length S]
        [--batch-size B] [--seed N]

CKPT is a run dir, checkpoint or converted dir of an smoe or MoEE model; PREFIX the target task's tokens
(.bin/.idx). Every routed layer's router logits and top-k counts on the first N tokens choose which experts merge
(cherry_megatron/prune/experts.py); an smoe model's Mixture of Attention experts are merged the same way, since
smoe.num_experts counts both. DIR receives model.safetensors, cherry_config.json and config.yaml with num_experts
D, top_k min(top_k, D) and ep_size 1 (train it at any EP dividing D: `--set smoe.ep_size=2`). The paper then
trains the router alone on the task: `python -m cherry_megatron.train --config DIR/config.yaml --set
'train.trainable=router|gate\\.wg' parallel.zero_stage=0 train.precision=fp32` (or fine-tune DIR as a whole). Prints each mixture's
clusters (anchor first) and usage, then a JSON summary line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cherry_megatron.errors import cli_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Router-only training (the paper's last step): cherry_megatron.train --config "
                                       "DIR/config.yaml --set 'train.trainable=router|gate\\.wg' "
                                       "parallel.zero_stage=0 train.precision=fp32")
    p.add_argument("--load", required=True, help="routed (smoe or moee) checkpoint")
    p.add_argument("--calib", required=True, help="the task's calibration tokens: prefix of a .bin/.idx pair")
    p.add_argument("--keep-experts", type=int, required=True, help="D: experts per layer after pruning, 1..E-1")
    p.add_argument("--output", required=True, help="new directory for the pruned checkpoint")
    p.add_argument("--method", default="uncurl",
                   help="uncurl: spectral clusters of router-logit similarity, aligned and frequency-weighted merges "
                        "(default); frequency: keep the D most used; frequency-merge: the D most used absorb the rest")
    p.add_argument("--router", default="mean",
                   help="the D router rows: mean (frequency-weighted mean of each cluster's rows, default) or "
                        "random (N(0, model.init_std), seeded by --seed)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens, whole windows (default 8192)")
    p.add_argument("--seq-length", type=int, default=256, help="calibration window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (the result does not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="k-means and --router random's seed")
    return p.parse_args(argv)


def check_args(args) -> None:
    from cherry_megatron.errors import ConfigError
    from cherry_megatron.prune.experts import METHODS, ROUTERS, assignment

    if args.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got '{args.method}'")
    if args.method != "frequency":
        assignment()  # before the calibration, not after it
    if args.router not in ROUTERS:
        raise ConfigError(f"--router must be one of {', '.join(ROUTERS)}, got '{args.router}'")
    if not 1 <= args.seq_length <= args.calib_tokens:
        raise ConfigError(f"--calib-tokens {args.calib_tokens} must hold at least one --seq-length "
                          f"{args.seq_length} window")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")


def check_model(args, cfg) -> None:
    from cherry_megatron.config import routing
    from cherry_megatron.errors import ConfigError

    sec = routing(cfg)
    if sec is None:
        raise ConfigError(f"{args.load} is not a routed model (smoe.num_experts and moee.num_experts are 0): "
                          "no experts to prune (tools/prune.py prunes dense width and depth)")
    if not 1 <= args.keep_experts < sec.num_experts:
        raise ConfigError(f"--keep-experts {args.keep_experts} must be in 1..{sec.num_experts - 1} (the model "
                          f"has {sec.num_experts} experts per layer)")


def calibrate(args, cfg, state, stream):
    """Usage of every routed mixture: the model built whole (TP=1, EP=1) in a world of one."""
    import copy

    from cherry_megatron import distributed
    from cherry_megatron.checkpoint.consolidate import build_loaded
    from cherry_megatron.config import ParallelConfig, routing
    from cherry_megatron.prune import experts
    from cherry_megatron.prune.importance import calibration_batches

    cfg = copy.deepcopy(cfg)
    cfg.moee.ep_size = cfg.smoe.ep_size = 1
    batches = calibration_batches(stream, args.seq_length, args.calib_tokens // args.seq_length, args.batch_size,
                                  cfg.model.vocab_size)
    distributed.set_threads(0)
    distributed.init(ParallelConfig())
    try:
        model = build_loaded(cfg, state, args.load)
        return experts.calibrate(model, batches, routing(cfg).top_k)
    finally:
        distributed.shutdown()


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli_errors():
        from cherry_megatron.checkpoint.consolidate import save_consolidated
        from cherry_megatron.config import from_dict, routing, to_yaml
        from cherry_megatron.convert.load import load_consolidated
        from cherry_megatron.data.indexed import token_stream
        from cherry_megatron.errors import CheckpointError, ConfigError
        from cherry_megatron.model import parameter_count
        from cherry_megatron.prune.experts import plan, prune_experts

        if Path(args.output).exists():
            raise CheckpointError(f"{args.output} exists already; choose a new --output")
        check_args(args)
        stream = token_stream(args.calib)  # a missing prefix fails before the checkpoint is read
        n_tokens = args.calib_tokens // args.seq_length * args.seq_length
        if len(stream) < n_tokens:
            raise ConfigError(f"{args.calib} holds {len(stream):,} tokens, fewer than --calib-tokens {n_tokens}")
        state, cfg_dict = load_consolidated(args.load)
        cfg = from_dict(cfg_dict)
        check_model(args, cfg)
        usage = calibrate(args, cfg, state, stream)
        groups = {name: plan(u, args.method, args.keep_experts, args.seed) for name, u in usage.items()}
        small_state, small = prune_experts(state, cfg, usage, groups, args.router, args.seed)
        small.name = f"{cfg.name}-{args.keep_experts}experts"
        print(f"{args.method}: {routing(cfg).num_experts} -> {args.keep_experts} experts per mixture, clusters "
              f"anchor first, usage = top-{routing(cfg).top_k} assignments per expert")
        for name in groups:
            clusters = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups[name])
            counts = " ".join(f"{e}:{c}" for e, c in enumerate(usage[name].counts.tolist()))
            print(f"{name:16} clusters {clusters}  usage {counts}")
        before, after = parameter_count(cfg), parameter_count(small)
        out = Path(args.output)
        save_consolidated(out, small_state, small.to_dict())
        small.model.init_from = str(out)
        (out / "config.yaml").write_text(to_yaml(small))
        print(json.dumps({"output": args.output, "method": args.method, "router": args.router,
                          "experts_before": routing(cfg).num_experts, "experts_after": args.keep_experts,
                          "top_k": routing(small).top_k, "calib_tokens": n_tokens, "params_before": before["total"],
                          "params_after": after["total"], "active_before": before["active"],
                          "active_after": after["active"], "clusters": groups}))


if __name__ == "__main__":
    main()
