"""Memory and communication per GPU for every valid (tp, pp, dp, zero) layout of a dense preset, and the
layout it recommends.

    cherry-plan --config dense-1b-48l --nodes N --gpus-per-node G [--gpu-memory-gib 80]
        [--micro-batch-size B] [--seq-length S] [--global-batch-size GB] [--activation-checkpointing]
        [--pipeline-partition layers|parameters] [--json]

The model, per GPU (or CPU rank), training with Adam under DeepSpeed, `--precision bf16` (default) or fp32:
  parameters   of the most loaded pipeline stage, split as the trainer splits them: stages by
               DeepSpeed's own `partition_balanced` over blocks or over parameters, as the trainer cuts
               them (`--pipeline-partition`, default the config's), TP-split weights / tp, norms whole;
  memory       weights and gradients 2 B (bf16) or 4 B (fp32), optimizer 12 B (fp32 master copy, m, v; ZeRO
               >= 1 keeps the master apart even in fp32, ZeRO-0 fp32 steps the weights: 8 B) per parameter,
               divided by dp where ZeRO partitions them (stage 1: optimizer; 2: + gradients; 3: + weights);
               buffers: DeepSpeed's reduce and all-gather (ZeRO-1/2) or live gathered-weight (ZeRO-3) buckets
               from the stage's ds_config JSON, and where torch's AdamW is not fused (CPU) the step's two
               temporaries of the largest flat partition (ZeRO-3: of a sub-group at most);
               activations s·b·h·(10 + 24/tp) B per layer and micro-batch (Korthikanti et al. 2022 with
               flash attention: no s² term), times the pp micro-batches in flight on the first stage
               (1F1B); with checkpointing 2·s·b·h B per layer plus one layer's full set; fp32 logits
               and their gradient on the last stage, 8·s·b·V/tp B;
  bytes sent   per step: TP 4 all-reduces of s·b·h bf16 per layer and micro-batch (ring: 2(tp-1)/tp);
               DP gradient all-reduce of 2 B per parameter (ring; ZeRO-3 1.5x for the weight gathers);
               PP one activation forward and one gradient back per micro-batch and stage boundary.
Estimated step time = compute at --mfu of --peak-tflops, stretched by the pipeline bubble (pp-1)/m,
plus communication at --intra-gbps within a node and --inter-gbps across nodes (not overlapped: a
pessimistic bound). The recommendation is the fitting layout with the lowest estimate.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from cherry_megatron.errors import cli_errors

GIB = 1024 ** 3


def layer_sizes(m, tp: int) -> list[int]:
    """Parameters one TP rank holds of each pipeline layer as `build_pipeline` lists them (vocab padded):
    [embed, blocks..., norm + head], or with tied embeddings [embed, blocks..., norm, embed copy + head].
    Each parameter counts whole or 1/tp as the model's own parameters say they split (`model.layout_table`)."""
    from cherry_megatron.config import Config
    from cherry_megatron.model import full_shapes, layout_table

    cfg = Config(model=m).to_dict()
    layout, shapes = layout_table(cfg), full_shapes(cfg)

    def held(prefix: str) -> int:
        return sum(math.prod(s) // (tp if layout(n) else 1) for n, s in shapes.items() if n.startswith(prefix))

    blocks = [held(f"layers.{i}.") for i in range(m.num_layers)]
    embed, norm = held("embed."), held("norm.")
    return [embed, *blocks, norm, embed] if m.tie_embeddings else [embed, *blocks, norm + held("head.")]


def stage_bounds(m, tp: int, pp: int, partition: str = "layers") -> list[int]:
    """Layer index bounds of each stage over [embed, blocks..., head], cut as the trainer's PipelineModule
    cuts them (`parallel.pipeline_partition`: equal block counts, or equal parameter counts)."""
    from deepspeed.runtime import utils as ds_utils

    sizes = layer_sizes(m, tp)
    weights = sizes if partition == "parameters" else [0] + [1] * m.num_layers + [0] * (len(sizes) - m.num_layers - 1)
    return ds_utils.partition_balanced(weights=weights, num_parts=pp)


def rank_parameters(m, tp: int, pp: int, stage: int, partition: str = "layers") -> int:
    """Parameters one rank of `stage` holds (model config `m`, vocab already padded)."""
    lo, hi = stage_bounds(m, tp, pp, partition)[stage:stage + 2]
    return sum(layer_sizes(m, tp)[lo:hi])


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int


def layouts(cfg, gpus: int, gpus_per_node: int) -> list[Layout]:
    m = cfg.model
    out = []
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0):
        if m.num_heads % tp or m.kv_heads % tp or m.ffn_size % tp:
            continue
        for pp in (p for p in range(1, m.num_layers + 1) if gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
                continue
            for zero in (0, 1) if pp > 1 else (0, 1, 2, 3):
                out.append(Layout(tp, pp, dp, zero))
    return out


def estimate(cfg, lay: Layout, args) -> dict:
    m, t = cfg.model, cfg.train
    s, b, h, v = t.seq_length, t.micro_batch_size, m.hidden_size, m.vocab_size
    micro = t.global_batch_size // (b * lay.dp)
    part = cfg.parallel.pipeline_partition
    params = max(rank_parameters(m, lay.tp, lay.pp, k, part) for k in range(lay.pp))
    bounds = stage_bounds(m, lay.tp, lay.pp, part)
    # Blocks on the busiest stage (the embedding and head layers count as none).
    layers = max(len(set(range(lo, hi)) & set(range(1, m.num_layers + 1))) for lo, hi in zip(bounds, bounds[1:]))
    w = 4 if args.precision == "fp32" else 2
    weights = w * params / (lay.dp if lay.zero >= 3 else 1)
    grads = w * params / (lay.dp if lay.zero >= 2 else 1)
    optim = (12 if lay.zero >= 1 or w == 2 else 8) * params / (lay.dp if lay.zero >= 1 else 1)
    buffers = _buffers(cfg, lay, params, w, args.precision)
    per_layer_act = s * b * h * (10 + 24 / lay.tp) * w / 2  # Korthikanti's bytes are for 2-byte activations
    in_flight = min(lay.pp, micro)
    act = in_flight * layers * (2 * s * b * h if args.activation_checkpointing else per_layer_act)
    act += per_layer_act if args.activation_checkpointing else 0
    logits = 8 * s * b * v / lay.tp
    total = weights + grads + optim + act + logits + buffers
    ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0  # noqa: E731
    tp_bytes = micro * layers * 4 * ring(lay.tp) * s * b * h * 2
    dp_bytes = ring(lay.dp) * 2 * params * (1.5 if lay.zero == 3 else 1.0)
    pp_bytes = micro * 2 * s * b * h * 2 if lay.pp > 1 else 0.0
    gpn = args.gpus_per_node
    # Rank order (megatron's and DeepSpeed's): TP fastest, then DP, then PP. TP stays in a node; a DP group
    # leaves the node when tp x dp exceeds it; pipeline neighbours are tp x dp ranks apart.
    dp_bw = args.inter_gbps if lay.tp * lay.dp > gpn else args.intra_gbps
    pp_bw = args.intra_gbps if lay.tp * lay.dp * lay.pp <= gpn else args.inter_gbps
    from cherry_megatron.model.gpt import flops_per_token

    gpus = lay.tp * lay.pp * lay.dp
    compute = flops_per_token(m, s) * t.global_batch_size * s / (gpus * args.peak_tflops * 1e12 * args.mfu)
    bubble = (lay.pp - 1) / micro
    seconds = compute * (1 + bubble) + tp_bytes / (args.intra_gbps * 1e9) + dp_bytes / (dp_bw * 1e9) + \
        pp_bytes / (pp_bw * 1e9)
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero": lay.zero, "params_per_gpu": params,
            "weights_gib": weights / GIB, "grads_gib": grads / GIB, "optimizer_gib": optim / GIB,
            "activations_gib": (act + logits) / GIB, "buffers_gib": buffers / GIB, "total_gib": total / GIB,
            "tp_gb": tp_bytes / 1e9, "dp_gb": dp_bytes / 1e9, "pp_gb": pp_bytes / 1e9, "bubble": bubble,
            "step_s": seconds, "fits": total <= args.gpu_memory_gib * GIB * 0.9}


def memory_estimate(cfg, lay: Layout, precision: str) -> dict:
    """`estimate` for a run's own layout, when only its memory figures are wanted (the trainer's
    `train.memory_limit_gib`, bench/gpu_check.py): activation checkpointing from the config; the step-time
    inputs are the command's defaults and do not change a memory figure."""
    args = SimpleNamespace(activation_checkpointing=cfg.train.activation_checkpointing > 0, precision=precision,
                           gpus_per_node=lay.tp * lay.pp * lay.dp, intra_gbps=200.0, inter_gbps=25.0,
                           peak_tflops=989.0, mfu=0.4, gpu_memory_gib=float("inf"))
    return estimate(cfg, lay, args)


def _buffers(cfg, lay: Layout, params: int, w: int, precision: str) -> float:
    """DeepSpeed's communication buckets (elements from the stage's JSON, in the weights' dtype) plus the
    optimizer step's temporaries where torch's AdamW runs unfused (CPU): its `exp_avg_sq.sqrt() / c` makes two
    tensors the size of the flat partition it steps (ZeRO-3 steps sub-groups of `sub_group_size` at most)."""
    from cherry_megatron.engine import DS_CONFIG_DIR

    path = cfg.parallel.ds_config or DS_CONFIG_DIR / f"zero{lay.zero}.json"
    zero = json.loads(open(path).read()).get("zero_optimization", {}) if lay.zero else {}
    num = lambda key, default: zero.get(key, default) if isinstance(zero.get(key, default), (int, float)) else default  # noqa: E731
    if lay.zero == 3:
        # gathered weights kept alive between uses: up to max_live_parameters (DeepSpeed's default 1e9)
        buckets = num("reduce_bucket_size", 5e8) + max(num("stage3_prefetch_bucket_size", 5e7),
                                                       num("stage3_max_live_parameters", 1e9))
    elif lay.zero:
        buckets = num("reduce_bucket_size", 5e8) + num("allgather_bucket_size", 5e8)
    else:
        buckets = 0
    partition = params / (lay.dp if lay.zero else 1)
    if lay.zero == 3:
        partition = min(partition, num("sub_group_size", 1e9))
    unfused = precision == "fp32"  # the trainer's fp32 runs are CPU runs (torch's fused AdamW is for CUDA there)
    return w * min(buckets, params) + (2 * 4 * partition if unfused else 0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--micro-batch-size", type=int, default=0)
    p.add_argument("--seq-length", type=int, default=0)
    p.add_argument("--global-batch-size", type=int, default=0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--pipeline-partition", choices=("layers", "parameters"), default="")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="weights/gradients/activations in bf16 (GPUs) or fp32 (CPU runs)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides as the trainer takes them (model.vocab_size=0: the tokenizer's)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, bf16 dense (H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--intra-gbps", type=float, default=200.0, help="GB/s per GPU inside a node (NVLink)")
    p.add_argument("--inter-gbps", type=float, default=25.0, help="GB/s per GPU across nodes (200 Gb/s IB)")
    p.add_argument("--json", action="store_true",
                   help="one JSON document on stdout instead of the table: the inputs, every layout's figures "
                        "('layouts') and the 'recommended' one (null when none fits; exit 2 as without --json)")
    args = p.parse_args(argv)
    # With --json stdout carries the document only: DeepSpeed's import-time logger prints to stdout.
    stdout = sys.stdout
    with cli_errors(), contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        from cherry_megatron.config import load_config
        from cherry_megatron.convert.load import checkpoint_layer
        from cherry_megatron.errors import ConfigError

        cfg = load_config(args.config, args.overrides, read_checkpoint=checkpoint_layer)
        cfg.parallel.pipeline_partition = args.pipeline_partition or cfg.parallel.pipeline_partition
        args.activation_checkpointing = args.activation_checkpointing or cfg.train.activation_checkpointing > 0
        if cfg.recurrent.num_blocks or cfg.moee.num_experts or cfg.smoe.num_experts:
            raise ConfigError("cherry-plan models dense presets only (as the pipeline does)")
        t = cfg.train
        t.micro_batch_size = args.micro_batch_size or t.micro_batch_size
        t.seq_length = args.seq_length or t.seq_length
        t.global_batch_size = args.global_batch_size or t.global_batch_size
        if cfg.model.vocab_size == 0:  # the tokenizer's, padded as the trainer pads it
            from cherry_megatron.data.tokenizer import load_tokenizer
            from cherry_megatron.model.gpt import pad_vocab

            m = cfg.model
            m.vocab_size = pad_vocab(load_tokenizer(cfg.data.tokenizer_model).vocab_size,
                                     m.make_vocab_size_divisible_by, cfg.parallel.tp)
        gpus = args.nodes * args.gpus_per_node
        rows = [estimate(cfg, lay, args) for lay in layouts(cfg, gpus, args.gpus_per_node)]
        if not rows:
            raise ConfigError(f"no layout of {gpus} GPUs divides the heads and global batch {t.global_batch_size}")
        fitting = [r for r in rows if r["fits"]]
        best = min(fitting, key=lambda r: (r["step_s"], r["total_gib"])) if fitting else None
        if args.json:
            print(json.dumps({"config": cfg.name, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                              "gpu_memory_gib": args.gpu_memory_gib, "micro_batch_size": t.micro_batch_size,
                              "seq_length": t.seq_length, "global_batch_size": t.global_batch_size,
                              "layouts": rows, "recommended": best}), file=stdout, flush=True)
        else:
            print(f"{cfg.name} on {args.nodes} x {args.gpus_per_node} GPUs, {args.gpu_memory_gib:g} GiB each | "
                  f"micro {t.micro_batch_size} x seq {t.seq_length}, global batch {t.global_batch_size}")
            print(f"{'tp':>3}{'pp':>3}{'dp':>4}{'zero':>5}{'params/GPU':>14}{'weights':>9}{'grads':>8}{'optim':>8}"
                  f"{'activ':>8}{'buffers':>8}{'total GiB':>10}{'TP GB':>8}{'DP GB':>8}{'PP GB':>7}{'bubble':>7}{'est s':>8}  fits")
            for r in rows:
                print(f"{r['tp']:>3}{r['pp']:>3}{r['dp']:>4}{r['zero']:>5}{r['params_per_gpu']:>14,}"
                      f"{r['weights_gib']:>9.2f}{r['grads_gib']:>8.2f}{r['optimizer_gib']:>8.2f}{r['activations_gib']:>8.2f}{r['buffers_gib']:>8.2f}"
                      f"{r['total_gib']:>10.2f}{r['tp_gb']:>8.2f}{r['dp_gb']:>8.2f}{r['pp_gb']:>7.2f}{r['bubble']:>7.2f}"
                      f"{r['step_s']:>8.2f}  {'yes' if r['fits'] else 'no'}")
        if best is None:
            raise ConfigError("no layout fits in memory: add GPUs, activation checkpointing or a smaller micro-batch")
        if not args.json:
            print(f"recommended: parallel.tp={best['tp']} parallel.pp={best['pp']} parallel.zero_stage={best['zero']} "
                  f"(dp={best['dp']}): {best['total_gib']:.1f} GiB per GPU, estimated {best['step_s']:.2f} s per step")


if __name__ == "__main__":
    main()
