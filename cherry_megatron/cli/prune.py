"""Prune a checkpoint in width and depth by importance (Minitron, cherry_megatron/prune/).

    cherry-prune --load CKPT --calib PREFIX --output DIR [--calib-samples N] [--seq-length S]
        [--target-heads H] [--target-ffn F] [--target-hidden D] [--target-layers L]
        [--importance minitron|random|magnitude] [--depth-importance bi|loss] [--seed N]
        [--eval-data PREFIX] [--eval-tokens N]

CKPT is a run dir, checkpoint or converted model dir at any TP degree; DIR receives model.safetensors,
cherry_config.json and config.yaml (train it at any TP: `python -m cherry_megatron.train --config DIR/config.yaml`).
Every importance score is computed on the unpruned model, then every axis is cut at once; each target is the
size every layer keeps (width is the same in every layer). Dense models prune in width and depth, recurrent
ones in width (heads and MLP). Prints the kept/dropped importance per axis, parameter counts, and held-out loss
before and after when --eval-data (default: the run's data.eval_path) is given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cherry_megatron.errors import cli_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--calib", required=True, help="calibration data: prefix of a .bin/.idx pair")
    p.add_argument("--output", required=True)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-length", type=int, default=0, help="calibration window; default: the run's train.seq_length")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward (scores do not depend on it)")
    for axis in ("heads", "ffn", "hidden", "layers"):
        p.add_argument(f"--target-{axis}", type=int, default=0, help="0: keep all")
    p.add_argument("--importance", default="minitron")
    p.add_argument("--depth-importance", default="bi")
    p.add_argument("--seed", type=int, default=0, help="--importance random's seed")
    p.add_argument("--eval-data", default="")
    p.add_argument("--eval-tokens", type=int, default=16384)
    return p.parse_args(argv)


def check_targets(args, cfg) -> None:
    from cherry_megatron.errors import ConfigError
    from cherry_megatron.prune.importance import DEPTH_IMPORTANCE, IMPORTANCE

    if args.importance not in IMPORTANCE:
        raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCE)}, got '{args.importance}'")
    if args.depth_importance not in DEPTH_IMPORTANCE:
        raise ConfigError(f"--depth-importance must be one of {', '.join(DEPTH_IMPORTANCE)}, got "
                          f"'{args.depth_importance}'")
    m = cfg.model
    sizes = {"heads": m.num_heads, "ffn": m.ffn_size, "hidden": m.hidden_size, "layers": m.num_layers}
    for axis, size in sizes.items():
        target = getattr(args, f"target_{axis}")
        if not 0 <= target <= size:
            raise ConfigError(f"--target-{axis} {target} must be in 1..{size} (the model's {axis}), or 0 to keep all")
    if cfg.recurrent.num_blocks and args.target_hidden and cfg.recurrent.iteration_norms:
        raise ConfigError("--target-hidden on a recurrent model with per-position norms is not built (its norm "
                          "outputs are not the block's modules'): prune its heads and MLP")
    if args.target_heads and m.kv_heads < m.num_heads and args.target_heads % m.kv_heads:
        raise ConfigError(f"--target-heads {args.target_heads} must be a multiple of the {m.kv_heads} KV groups")


def scores(args, cfg, state):
    """Importance of every axis on the unpruned model."""
    from cherry_megatron import distributed
    from cherry_megatron.checkpoint.consolidate import build_loaded
    from cherry_megatron.config import ParallelConfig
    from cherry_megatron.data.indexed import token_stream
    from cherry_megatron.prune import importance as imp

    if args.importance == "random":
        return imp.random_scores(state, cfg, args.seed)
    if args.importance == "magnitude":
        return imp.weight_scores(state, cfg)
    distributed.set_threads(0)
    distributed.init(ParallelConfig())
    try:
        model = build_loaded(cfg, state, args.load)
        batches = imp.calibration_batches(token_stream(args.calib), args.seq_length or cfg.train.seq_length,
                                          args.calib_samples, args.batch_size, cfg.model.vocab_size)
        s = imp.activation_scores(model, batches)
        if args.target_layers and args.depth_importance == "loss":
            s.depth = imp.loss_depth_scores(model, batches)
        return s
    finally:
        distributed.shutdown()


def choose(args, cfg, s):
    """(Keep, table rows): the top of every pruned axis, per layer for heads and MLP."""
    import torch

    from cherry_megatron.prune.slicing import Keep, top_heads, top_k

    keep, rows = Keep(), []

    def row(axis, score, kept):
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[kept] = True
        dropped = score[~mask]
        rows.append((axis, int(mask.sum()), int((~mask).sum()), score[mask].min().item(),
                     dropped.max().item() if dropped.numel() else float("nan")))

    m = cfg.model
    if args.target_ffn and args.target_ffn < m.ffn_size:
        keep.ffn = [top_k(f, args.target_ffn) for f in s.ffn]
        for i, (f, k) in enumerate(zip(s.ffn, keep.ffn)):
            row(f"ffn, layer {i}", f, k)
    if args.target_heads and args.target_heads < m.num_heads:
        groups = m.kv_heads if m.kv_heads < m.num_heads else 1
        keep.heads = [top_heads(h, groups, args.target_heads) for h in s.heads]
        for i, (h, k) in enumerate(zip(s.heads, keep.heads)):
            row(f"heads, layer {i}", h, k)
    if args.target_hidden and args.target_hidden < m.hidden_size:
        keep.hidden = top_k(s.hidden, args.target_hidden)
        row("hidden", s.hidden, keep.hidden)
    if args.target_layers and args.target_layers < m.num_layers:
        # The least important layers go: the highest-scored stay, in their order
        keep.layers = top_k(s.depth, args.target_layers).tolist()
        row("layers", s.depth, torch.tensor(keep.layers))
    return keep, rows


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli_errors():
        from cherry_megatron.checkpoint.consolidate import save_consolidated
        from cherry_megatron.evaluate import heldout_losses
        from cherry_megatron.config import from_dict, to_yaml
        from cherry_megatron.convert.load import load_consolidated
        from cherry_megatron.errors import CheckpointError
        from cherry_megatron.model import parameter_count
        from cherry_megatron.prune.slicing import prune_state

        if Path(args.output).exists():
            raise CheckpointError(f"{args.output} exists already; choose a new --output")
        state, cfg_dict = load_consolidated(args.load)
        cfg = from_dict(cfg_dict)
        check_targets(args, cfg)
        s = scores(args, cfg, state)
        keep, rows = choose(args, cfg, s)
        small_state, small = prune_state(state, cfg, keep)
        small.name = f"{cfg.name}-pruned"
        print(f"{'axis':24}{'kept':>8}{'dropped':>8}{'lowest kept':>14}{'highest dropped':>17}  ({args.importance})")
        for axis, k, d, lo, hi in rows:
            print(f"{axis:24}{k:>8}{d:>8}{lo:>14.5g}{hi:>17.5g}")
        if s.depth is not None and keep.layers is not None:
            print("depth importance by layer: " + " ".join(f"{i}:{v:.4f}" for i, v in enumerate(s.depth.tolist())))
        before, after = parameter_count(cfg), parameter_count(small)
        print(f"{'parameters':24}{'before':>16}{'after':>16}")
        for key in ("layers", "embedding", "head", "total"):
            print(f"{key:24}{before[key]:>16,}{after[key]:>16,}")
        result = {"output": args.output, "importance": args.importance, "params_before": before["total"],
                  "params_after": after["total"], "non_embedding_before": before["layers"],
                  "non_embedding_after": after["layers"], "kept_layers": keep.layers}
        data = args.eval_data or cfg.data.eval_path
        if data:
            result["heldout_loss_before"], result["heldout_loss_after"] = heldout_losses(
                [(cfg, state), (small, small_state)], data, args.eval_tokens)
            print(f"held-out loss: before {result['heldout_loss_before']:.4f}, after pruning "
                  f"{result['heldout_loss_after']:.4f}")
        out = Path(args.output)
        save_consolidated(out, small_state, small.to_dict())
        small.model.init_from = str(out)
        (out / "config.yaml").write_text(to_yaml(small))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
