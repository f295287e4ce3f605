"""Fuse compressed (recurrent or dense) models into one MoEE model (model/moee.py), Branch-Train-MiX style.

Expert e's MLPs come from model e: block b's SwiGLU becomes expert e of block b's routed MLP, and model
e's per-position MLP LoRA goes with it (the positions that run block b, in order). Everything else is
the fp32 mean over the models: embedding, output layer, attention, norms, iteration embeddings and the
attention LoRA factors. The mean of LoRA factors is not the mean of their products B·A; the models
are meant to branch from one compressed model (BTX), where the factors stay close. A router per block
is initialised `random` (normal, the model's init_std, seeded) or `zeros` (uniform routing at start).
Works on full (TP=1) state dicts, so experts saved at different TP degrees fuse the same way.
"""
from __future__ import annotations

import copy
import re

import torch

from cherry_megatron.config import Config
from cherry_megatron.errors import ConfigError
from cherry_megatron.model.moee import EXPERTS

ROUTER_INITS = ("random", "zeros")
_MLP_WEIGHT = re.compile(r"^layers\.(\d+)\.mlp\.(gate_up|down)\.weight$")
_MLP_LORA = re.compile(r"^lora_(gate_up|down)_([AB])$")
# What may differ between the models of one fusion: how each was trained, not what it is.
_FREE_KEYS = ("name", "model.init_from", "data", "train", "sgt", "parallel", "recurrent.exit_depths",
              "recurrent.exit_loss_weights")


def shape_of(cfg: Config) -> dict:
    d = cfg.to_dict()
    for key in _FREE_KEYS:
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    d["moee"] = {k: v for k, v in d["moee"].items() if k.startswith("mtp")}
    return d


def fuse(states: list[dict[str, torch.Tensor]], cfgs: list[Config], top_k: int = 1, router_init: str = "random",
         seed: int = 1234) -> tuple[dict[str, torch.Tensor], Config]:
    """(MoEE full state dict, MoEE config) from E models' full state dicts and configs."""
    if router_init not in ROUTER_INITS:
        raise ConfigError(f"--router-init must be one of {', '.join(ROUTER_INITS)}, got '{router_init}'")
    if not states:
        raise ConfigError("give at least one expert checkpoint")
    first = shape_of(cfgs[0])
    for i, c in enumerate(cfgs):
        if c.moee.num_experts or c.smoe.num_experts:
            raise ConfigError(f"expert {i} is a routed model already; fuse dense or recurrent models")
        shape = shape_of(c)
        if shape != first:
            diff = next(k for k in shape if shape[k] != first.get(k))
            raise ConfigError(f"expert {i} differs from expert 0 in its '{diff}' config: experts must share one shape")
    e = len(states)
    if not 1 <= top_k <= e:
        raise ConfigError(f"--top-k {top_k} must lie in 1..{e} (the number of experts)")
    cfg = copy.deepcopy(cfgs[0])
    m, r = cfg.model, cfg.recurrent
    schedule = r.resolved_schedule(m.num_layers) if r.num_blocks else list(range(m.num_layers))
    blocks = r.num_blocks or m.num_layers
    out: dict[str, torch.Tensor] = {}
    for name in states[0]:
        if any(name not in s for s in states):
            raise ConfigError(f"expert checkpoints disagree: '{name}' is missing from one of them")
        w, lora = _MLP_WEIGHT.match(name), _MLP_LORA.match(name)
        if w:
            for g, s in enumerate(states):
                out[f"layers.{w.group(1)}.{EXPERTS}.{g}.{w.group(2)}.weight"] = s[name].float()
        elif lora:
            proj, part = lora.groups()
            for b in range(blocks):
                positions = [i for i, blk in enumerate(schedule) if blk == b]
                for g, s in enumerate(states):
                    out[f"layers.{b}.{EXPERTS}.{g}.{proj}_lora_{part}"] = s[name][positions].float()
        else:
            out[name] = torch.stack([s[name].float() for s in states]).mean(0)
    gen = torch.Generator().manual_seed(seed)
    for b in range(blocks):
        router = torch.zeros(e, m.hidden_size)
        out[f"layers.{b}.mlp.deepspeed_moe.gate.wg.weight"] = \
            router.normal_(0.0, m.init_std, generator=gen) if router_init == "random" else router
    cfg.moee.num_experts, cfg.moee.top_k = e, top_k
    cfg.name = f"moee-{e}x-{cfgs[0].name}"
    m.init_from = ""
    return out, cfg
