"""The DeepSpeed engine for a model: a JSON from ds_configs/ with its "auto" values filled from our config.

The JSON owns what DeepSpeed owns (ZeRO stage and buckets, optimizer type, precision, offload); our
config owns the numbers a run is described by (batch sizes, lr, clipping), so "auto" in the JSON means
"take it from the training config", as in the Hugging Face integration.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.pipe import PipelineModule

from cherry_megatron.config import Config
from cherry_megatron.distributed import MegatronMPU
from cherry_megatron.errors import ConfigError

# The shipped DeepSpeed JSONs: package data (cherry_megatron/ds_configs/), so an installed package finds them too;
# a user's parallel.ds_config path is read as given.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision=fp16 needs a GPU; use fp32 (or bf16, slowly) on CPU")
        # bf16 on a CPU runs (a micro model tests the GPU's mixed-precision path that way), but without bf16
        # units a bf16 matmul runs ~500x slower than fp32 (docs/DESIGN.md): `auto` picks fp32 there.
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a run of `train.precision` computes in on `device`: what evaluation and a frozen reference
    model use too, so they measure the model the trainer ran."""
    return DTYPES[resolve_precision(precision, device)]


def _fill(node, values: dict, path: str = ""):
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}{k}.") for k, v in node.items()}
    if node == "auto":
        key = path.rstrip(".")
        if key not in values:
            raise ConfigError(f"DeepSpeed config: no value for \"auto\" at '{key}'")
        return values[key]
    return node


def deepspeed_config(cfg: Config, dp: int, device: torch.device) -> dict:
    path = Path(cfg.parallel.ds_config) if cfg.parallel.ds_config else DS_CONFIG_DIR / f"zero{cfg.parallel.zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"malformed DeepSpeed config {path}: {e}") from None
    stage = raw.get("zero_optimization", {}).get("stage", "auto")
    if stage not in ("auto", cfg.parallel.zero_stage):
        raise ConfigError(f"{path} sets ZeRO stage {stage} but parallel.zero_stage={cfg.parallel.zero_stage}")
    t = cfg.train
    precision = resolve_precision(t.precision, device)
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": [t.beta1, t.beta2],
        "optimizer.params.weight_decay": t.weight_decay,
        # torch's AdamW everywhere: DeepSpeed's FusedAdam (and its CPUAdam under offload) are compiled at first
        # use (nvcc + CUDA_HOME, or a C++ toolchain), minutes per fresh node or a failed start.
        "optimizer.params.torch_adam": True,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "zero_optimization.stage": cfg.parallel.zero_stage,
    }
    out = _fill(raw, values)
    if precision == "bf16":
        if cfg.parallel.zero_stage == 0:
            raise ConfigError("train.precision=bf16 needs parallel.zero_stage >= 1: with ZeRO-0 DeepSpeed accumulates "
                              "and all-reduces gradients in bf16 (it refuses fp32 accumulation there)")
        # Micro-batch gradients summed and reduced over DP in fp32, not bf16 (ZeRO-1: DeepSpeed's BF16_Optimizer).
        out.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        out.setdefault("communication_data_type", "fp32")
    params = out.get("optimizer", {}).get("params", {})
    offloaded = out.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if params.get("torch_adam") and device.type == "cuda" and not offloaded:
        params.setdefault("fused", True)  # torch's fused CUDA kernel: one launch per parameter group, no build
    return out


def lr_lambda(t):
    """Linear warm-up from lr/warmup to lr, then cosine down to min_lr_ratio * lr (Megatron's schedule)."""
    def fn(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def freeze_except(model: torch.nn.Module, pattern: str, zero_stage: int) -> tuple[int, int]:
    """Freeze every parameter whose name does not match `pattern` (re.search): (trainable, total) elements.
    A frozen parameter is left out of the optimizer (param_groups), so DeepSpeed neither reduces nor updates it."""
    wanted = re.compile(pattern)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(wanted.search(name)))
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3's partitioned weight: its whole size
        total += n
        trainable += n if p.requires_grad else 0
    if not trainable:
        raise ConfigError(f"train.trainable '{pattern}' matches no parameter of the model (names such as "
                          f"{next(n for n, _ in model.named_parameters())})")
    experts = [p for p in model.parameters() if is_moe_param(p)]
    if experts and zero_stage > 0 and not any(p.requires_grad for p in experts):
        # DeepSpeed 0.19.8's ZeRO-1/2 optimizer (and its BF16_Optimizer) asserts that a model with MoE layers has
        # a param group of experts; an empty one breaks its flattening, and marking the routers' group as experts
        # would reduce their gradients over the expert-data-parallel ranks only.
        raise ConfigError(f"train.trainable '{pattern}' freezes every expert, which DeepSpeed's ZeRO-1/2 optimizer "
                          "refuses for a model with MoE layers: train with parallel.zero_stage=0 "
                          "train.precision=fp32 (ZeRO-0 takes no bf16), whose optimizer state for the routers "
                          "alone is small")
    return trainable, total


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms (1-D weights), as is standard for Llama-style models. Expert weights go to
    groups of their own (DeepSpeed reduces their gradients over expert-data-parallel ranks only)."""

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a weight zero.Init partitioned is an empty 1-D tensor: its shape is `ds_shape`
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if any(is_moe_param(p) for p in decay + no_decay):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def engine_args(device: torch.device):
    """What deepspeed.initialize takes as `args`: on a GPU the ordinal `distributed.select_device` chose, or
    DeepSpeed sets LOCAL_RANK as the device, an invalid ordinal when each task sees one GPU; None elsewhere."""
    return argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None


def partitioned_build(build, cfg: Config, dp: int, device: torch.device, dp_group) -> torch.nn.Module:
    """`build()` under DeepSpeed's `zero.Init` at ZeRO-3 (no pipeline): each module's weights are made whole,
    initialised from the seeded RNG exactly as without it, and cut to this rank's partition as soon as that
    module's constructor returns, so a rank holds its partitions plus one module's full weights, never the
    model. Other stages build whole (ZeRO-1/2 keep full weights on every rank anyway); `parallel.zero_init:
    false` builds whole at ZeRO-3 too (DeepSpeed partitions the built model then)."""
    if cfg.parallel.zero_stage != 3 or cfg.parallel.pp > 1 or not cfg.parallel.zero_init:
        return build()
    # No `dtype=`: given explicitly, 0.19.8 takes bf16 on any accelerator without fp16 (CPU included) whatever
    # was asked (operator precedence in `Init._set_dtype`); from the config's bf16/fp16 flags it is right.
    # `mpu`: the config's batch sizes are checked against the DP size, not the world's.
    with deepspeed.zero.Init(data_parallel_group=dp_group, config_dict_or_path=deepspeed_config(cfg, dp, device),
                             mpu=MegatronMPU()):
        return build()


def build_engine(model: torch.nn.Module, cfg: Config, dp: int, device: torch.device, load_universal: bool = False):
    ds_cfg = deepspeed_config(cfg, dp, device)
    if load_universal:  # the next load_checkpoint reads a universal checkpoint and re-slices it for this layout
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    scheduler = None
    if "scheduler" not in ds_cfg:
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train))  # noqa: E731

    # A PipelineModule brings its own grid (the same rank order as megatron's, distributed.check_topology).
    mpu = None if isinstance(model, PipelineModule) else MegatronMPU()
    engine, _, _, _ = deepspeed.initialize(args=engine_args(device), model=model, config=ds_cfg, mpu=mpu,
                                           model_parameters=param_groups(model, cfg.train.weight_decay),
                                           lr_scheduler=scheduler)
    return engine, ds_cfg
