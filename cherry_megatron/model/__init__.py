"""Models built from the config tree: dense (`gpt.py`), recurrent (`recurrent.py`, recurrent.num_blocks > 0),
routed (`moee.py`, moee.num_experts > 0); any of them with multi-token prediction (`mtp.py`, moee.mtp_depth > 0);
and the JetMoE-style sparse model (`smoe.py`, smoe.num_experts > 0)."""
from __future__ import annotations

import functools
import json

import torch
from megatron.core import parallel_state

from cherry_megatron import distributed
from cherry_megatron.config import ParallelConfig, from_dict
from cherry_megatron.model.gpt import GPT, count_parameters, flops_per_token
from cherry_megatron.model.moee import MoEEGPT, count_moee_parameters
from cherry_megatron.model.recurrent import RecurrentGPT, count_recurrent_parameters
from cherry_megatron.model.smoe import SMoEGPT, count_smoe_parameters, smoe_flops_per_token
from cherry_megatron.model.tp_layout import Table, key, of


def build_model(cfg, params_dtype: torch.dtype = torch.float32) -> GPT:
    options = dict(mtp_depth=cfg.moee.mtp_depth, mtp_weight=cfg.moee.mtp_weight,
                   checkpoint_every=cfg.train.activation_checkpointing,
                   exits=dict(zip(cfg.train.exit_depths, cfg.train.exit_loss_weights)),
                   exit_distill_weight=cfg.train.exit_distill_weight)
    if cfg.smoe.num_experts:
        return SMoEGPT(cfg.model, cfg.smoe, params_dtype, **options)
    if cfg.moee.num_experts:
        return MoEEGPT(cfg.model, cfg.recurrent, cfg.moee, params_dtype, **options)
    if cfg.recurrent.num_blocks:
        return RecurrentGPT(cfg.model, cfg.recurrent, params_dtype, **options)
    return GPT(cfg.model, params_dtype, **options)


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every decoder block in place (`train.compile`), as torchtitan does: one graph per block
    type, reused by all, and the embedding, head and loss (megatron's vocab-parallel cross-entropy) stay
    eager. Returns the number of blocks compiled."""
    from cherry_megatron.model.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def training_flops_per_token(cfg) -> float:
    """What a training token costs the model (for MFU): model/gpt.py's 6N + 12 L H S, N the weights it passes
    through (k of a routed model's experts)."""
    s = cfg.train.seq_length
    if cfg.smoe.num_experts:
        return smoe_flops_per_token(cfg.model, cfg.smoe, s)
    e = cfg.moee
    return flops_per_token(cfg.model, s, e.top_k if e.num_experts else 1, e.mtp_depth)


def parameter_count(cfg) -> dict:
    """Analytic counts by part; `total` is what is stored, `active` what one token passes through."""
    if cfg.smoe.num_experts:
        out = count_smoe_parameters(cfg.model, cfg.smoe)
    elif cfg.moee.num_experts:
        out = count_moee_parameters(cfg.model, cfg.recurrent, cfg.moee)
    elif cfg.recurrent.num_blocks:
        out = count_recurrent_parameters(cfg.model, cfg.recurrent)
    else:
        out = count_parameters(cfg.model)
    out.setdefault("active", out["total"])
    if cfg.moee.mtp_depth:
        h = cfg.model.hidden_size
        mtp = cfg.moee.mtp_depth * (count_parameters(cfg.model)["per_layer"] + 2 * h * h + 3 * h)
        out.update(mtp=mtp, total=out["total"] + mtp, active=out["active"] + mtp)
    return out


def layout_table(cfg_dict: dict) -> Table:
    """How every parameter of the model `cfg_dict` (a `Config.to_dict()`) describes is split over TP ranks
    (model/tp_layout.py), read off a meta-device build of it."""
    return Table({key(name): layout for name, layout, _ in _parameters(json.dumps(cfg_dict, sort_keys=True))})


def full_shapes(cfg_dict: dict) -> dict[str, tuple]:
    """{name: shape} of every parameter of the full (TP=1) model `cfg_dict` describes, every expert included."""
    return {name: shape for name, _, shape in _parameters(json.dumps(cfg_dict, sort_keys=True))}


@functools.lru_cache(maxsize=8)
def _parameters(cfg_json: str) -> tuple:
    """(name, layout, full shape) per parameter. Built in a world of its own when none exists; inside one
    (the trainer, at any TP) the model is built there, and a split dimension is scaled back by the TP degree
    (layouts do not depend on it). A routed model then creates DeepSpeed's ep_size=1 expert groups, a
    collective, which is why every rank of a run loads a checkpoint at the same point."""

    cfg = from_dict(json.loads(cfg_json))
    cfg.moee.ep_size = cfg.smoe.ep_size = 1
    own = not parallel_state.model_parallel_is_initialized()
    if own:
        distributed.init(ParallelConfig())
    try:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        with torch.device("meta"):
            params = list(build_model(cfg).named_parameters())
    finally:
        if own:
            distributed.shutdown()
    out = []
    for name, p in params:
        layout, shape = of(p), list(p.shape)
        if layout is not None:
            shape[layout[0]] *= tp
        out.append((name, layout, tuple(shape)))
    return tuple(out)
