"""The recurrent model: K shared blocks unrolled to `model.num_layers` positions (Relaxed Recursive
Transformers), with learned per-position parameters and early exit.

Position i runs block `schedule[i]`; before it a per-position embedding is added to the residual stream,
its RMSNorm weights are the position's own, and each projection gets a per-position LoRA delta B_i A_i
(`recurrent.lora_rank`). Iteration embeddings start at zero, so a model compressed by
`tools/compress_depth.py` with full-rank LoRA computes exactly the dense model it came from.
The output layer and the SGT path (`select=`) are the dense model's; any position may read out early.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import nn

from cherry_megatron.config import ModelConfig, RecurrentConfig
from cherry_megatron.model.gpt import GPT, count_parameters
from cherry_megatron.model.tp_layout import lora_layouts, mark, tp_slice
from cherry_megatron.model.layers import PositionParams, position_params

PROJECTIONS = ("q", "kv", "o", "gate_up", "down")
PROJ_WEIGHTS = {"q": "attn.q.weight", "kv": "attn.kv.weight", "o": "attn.o.weight",  # the weight each LoRA modifies
                "gate_up": "mlp.gate_up.weight", "down": "mlp.down.weight"}


def lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of the full (TP=1) model."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    return {"q": (h, cfg.num_heads * hd), "kv": (h, 2 * cfg.kv_heads * hd), "o": (cfg.num_heads * hd, h),
            "gate_up": (h, 2 * f), "down": (f, h)}


class RecurrentGPT(GPT):
    lora_projections = PROJECTIONS  # the projections with a per-position LoRA (a routed model's MLPs have their own)

    def __init__(self, cfg: ModelConfig, rcfg: RecurrentConfig, params_dtype: torch.dtype = torch.float32,
                 mlp_factory=None, **options):
        """`options`: GPT's (mtp_depth, mtp_weight, checkpoint_every)."""
        super().__init__(cfg, params_dtype, recurrent=rcfg, mlp_factory=mlp_factory, **options)

    def build_position_parameters(self, params_dtype: torch.dtype) -> None:
        cfg, rcfg, n = self.cfg, self.rcfg, len(self.schedule)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        if rcfg.iteration_embedding:
            self.iter_embed = nn.Parameter(torch.zeros(n, cfg.hidden_size, dtype=params_dtype))
        if rcfg.iteration_norms:
            self.iter_norms = nn.Parameter(torch.ones(n, 2, cfg.hidden_size, dtype=params_dtype))
        r = rcfg.lora_rank
        shapes = [(k, v) for k, v in lora_shapes(cfg).items() if k in self.lora_projections] if r else []
        for name, (fan_in, fan_out) in shapes:
            # Full-size tensors from the seeded CPU generator, then this rank's slice: the same model at any TP.
            full = {"A": torch.randn(n, r, fan_in) * cfg.init_std, "B": torch.zeros(n, fan_out, r)}
            layouts = dict(zip("AB", lora_layouts(self.layers[0].get_parameter(PROJ_WEIGHTS[name]))))
            for part, t in full.items():
                layout = layouts[part]
                t = tp_slice(t, *layout, tp, rank) if layout else t
                self.register_parameter(f"lora_{name}_{part}", mark(nn.Parameter(t.to(params_dtype)), layout))
        # Position i is its block's local_position[i]-th run: the row of a routed block's expert LoRA stacks.
        self.local_position = [self.schedule[:i].count(b) for i, b in enumerate(self.schedule)]

    def position(self, i: int) -> PositionParams:
        return position_params(self, i, self.rcfg, self.lora_projections, self.local_position[i])


def count_recurrent_parameters(cfg: ModelConfig, rcfg: RecurrentConfig) -> dict:
    """Analytic count: K blocks instead of num_layers, plus the per-position parameters."""
    dense = count_parameters(cfg)
    n, h = cfg.num_layers, cfg.hidden_size
    per_position = (h if rcfg.iteration_embedding else 0) + (2 * h if rcfg.iteration_norms else 0) + \
        rcfg.lora_rank * sum(i + o for i, o in lora_shapes(cfg).values())
    blocks = rcfg.num_blocks * dense["per_layer"]
    layers = blocks + n * per_position
    return {**dense, "blocks": blocks, "per_position": per_position, "layers": layers,
            "total": dense["total"] - dense["layers"] + layers}
