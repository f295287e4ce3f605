"""Models built from the config tree: dense (`gpt.py`) or recurrent (`recurrent.py`, recurrent.num_blocks > 0)."""
from __future__ import annotations

import torch


def build_model(cfg, params_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from cherry_megatron.model.gpt import GPT
    from cherry_megatron.model.recurrent import RecurrentGPT

    if cfg.recurrent.num_blocks:
        return RecurrentGPT(cfg.model, cfg.recurrent, params_dtype)
    return GPT(cfg.model, params_dtype)


def parameter_count(cfg) -> dict:
    from cherry_megatron.model.gpt import count_parameters
    from cherry_megatron.model.recurrent import count_recurrent_parameters

    if cfg.recurrent.num_blocks:
        return count_recurrent_parameters(cfg.model, cfg.recurrent)
    return count_parameters(cfg.model)
