"""Depth compression: a dense model's L layers -> K shared blocks of a recurrent model (recurrent.py).

Position i of the recurrent model stands for original layer i and runs block `i * K // L`: each block
replaces a group of L/K consecutive layers, as CHERRY's repeated averaging of adjacent pairs
(48 -> 24 -> 12 -> 6) does; the mean of pair-means is the mean of the group, so one fp32 mean per group
gives the same blocks. Initialisations of a block from its group (Relaxed Recursive Transformers):
  average   the fp32 mean of the group's layers;
  stepwise  the group's first layer (every L/K-th layer of the dense model);
  lower     layer k of the dense model (its K lowest layers).
Per-position parameters make up for the sharing: position i's norm weights are layer i's own, and its
LoRA is the rank-r truncated SVD of the residual W_i - W_block (B = U_r S_r, A = V_r^T), so at full rank
the recurrent model computes the dense one exactly. Everything works on full (TP=1) state dicts, so a
checkpoint at any TP degree compresses the same way after consolidation.
"""
from __future__ import annotations

import copy
import re

import torch

from cherry_megatron.config import Config
from cherry_megatron.errors import ConfigError
from cherry_megatron.model.recurrent import PROJ_WEIGHTS, PROJECTIONS

INITS = ("average", "stepwise", "lower")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def layer_groups(num_layers: int, num_blocks: int) -> list[list[int]]:
    if num_blocks < 1 or num_layers % num_blocks:
        raise ConfigError(f"--target-layers {num_blocks} must divide the dense model's {num_layers} layers")
    g = num_layers // num_blocks
    return [list(range(k * g, (k + 1) * g)) for k in range(num_blocks)]


def split_layers(state: dict[str, torch.Tensor]) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({layer index: {name inside the layer: tensor}}, the other tensors)."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    rest = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            rest[name] = t
    return layers, rest


def shared_blocks(layers: dict[int, dict[str, torch.Tensor]], groups: list[list[int]], init: str) -> list[dict]:
    if init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, got '{init}'")
    blocks = []
    for k, group in enumerate(groups):
        if init == "average":
            blocks.append({n: torch.stack([layers[i][n].float() for i in group]).mean(0) for n in layers[group[0]]})
        else:
            src = group[0] if init == "stepwise" else k
            blocks.append({n: t.float().clone() for n, t in layers[src].items()})
    return blocks


def svd_lora(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of `residual` [out, in]."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    return vh[:rank].float(), (u[:, :rank] * s[:rank]).float()


def compress(state: dict[str, torch.Tensor], cfg: Config, num_blocks: int, init: str = "average",
             lora_rank: int = 0) -> tuple[dict[str, torch.Tensor], Config]:
    """(recurrent state dict, recurrent config) from a dense full state dict and its config."""
    if cfg.recurrent.num_blocks:
        raise ConfigError("the checkpoint is a recurrent model already; compress a dense one")
    n = cfg.model.num_layers
    groups = layer_groups(n, num_blocks)
    layers, rest = split_layers(state)
    if sorted(layers) != list(range(n)):
        raise ConfigError(f"the checkpoint holds layers {sorted(layers)[:4]}..., its config says {n}")
    blocks = shared_blocks(layers, groups, init)
    out = dict(rest)
    for k, block in enumerate(blocks):
        out.update({f"layers.{k}.{name}": t for name, t in block.items()})
    rcfg = copy.deepcopy(cfg)
    r = rcfg.recurrent
    r.num_blocks, r.schedule, r.lora_rank = num_blocks, [], lora_rank
    r.iteration_embedding, r.iteration_norms = True, True
    rcfg.name = f"{cfg.name}-r{num_blocks}"
    rcfg.model.init_from = ""
    schedule = r.resolved_schedule(n)
    out["iter_embed"] = torch.zeros(n, cfg.model.hidden_size)
    out["iter_norms"] = torch.stack([torch.stack([layers[i]["attn_norm.weight"], layers[i]["mlp_norm.weight"]])
                                     for i in range(n)]).float()
    max_rank = min(min(layers[0][w].shape) for w in PROJ_WEIGHTS.values())
    if not 0 <= lora_rank <= max_rank:
        raise ConfigError(f"--lora-rank must be in 0..{max_rank} (the smallest projection's full rank)")
    for p in PROJECTIONS if lora_rank else ():
        pairs = [svd_lora(layers[i][PROJ_WEIGHTS[p]].float() - blocks[schedule[i]][PROJ_WEIGHTS[p]], lora_rank)
                 for i in range(n)]
        out[f"lora_{p}_A"] = torch.stack([a for a, _ in pairs])
        out[f"lora_{p}_B"] = torch.stack([b for _, b in pairs])
    return out, rcfg
