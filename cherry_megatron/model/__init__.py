"""Models built from the config tree: dense (`gpt.py`), recurrent (`recurrent.py`, recurrent.num_blocks > 0),
routed (`moee.py`, moee.num_experts > 0); any of them with multi-token prediction (`mtp.py`, moee.mtp_depth > 0)."""
from __future__ import annotations

import torch


def build_model(cfg, params_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from cherry_megatron.model.gpt import GPT
    from cherry_megatron.model.moee import MoEEGPT
    from cherry_megatron.model.mtp import MTP
    from cherry_megatron.model.recurrent import RecurrentGPT

    if cfg.moee.num_experts:
        model = MoEEGPT(cfg.model, cfg.recurrent, cfg.moee, params_dtype)
    elif cfg.recurrent.num_blocks:
        model = RecurrentGPT(cfg.model, cfg.recurrent, params_dtype)
    else:
        model = GPT(cfg.model, params_dtype)
    model.checkpoint_every = cfg.train.activation_checkpointing
    if cfg.moee.mtp_depth:
        model.mtp = MTP(cfg.model, cfg.moee.mtp_depth, params_dtype)
        model.mtp_weight = cfg.moee.mtp_weight
    return model


def parameter_count(cfg) -> dict:
    """Analytic counts by part; `total` is what is stored, `active` what one token passes through."""
    from cherry_megatron.model.gpt import count_parameters
    from cherry_megatron.model.moee import count_moee_parameters
    from cherry_megatron.model.recurrent import count_recurrent_parameters

    if cfg.moee.num_experts:
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
