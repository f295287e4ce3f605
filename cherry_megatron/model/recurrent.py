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
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from cherry_megatron.config import ModelConfig, RecurrentConfig
from cherry_megatron.model.gpt import GPT, count_parameters
from cherry_megatron.model.layers import tp_layout, tp_slice

PROJECTIONS = ("q", "kv", "o", "gate_up", "down")


def lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of the full (TP=1) model."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    return {"q": (h, cfg.num_heads * hd), "kv": (h, 2 * cfg.kv_heads * hd), "o": (cfg.num_heads * hd, h),
            "gate_up": (h, 2 * f), "down": (f, h)}


class RecurrentGPT(GPT):
    def __init__(self, cfg: ModelConfig, rcfg: RecurrentConfig, params_dtype: torch.dtype = torch.float32,
                 mlp_factory=None, lora_projections=PROJECTIONS):
        super().__init__(cfg, params_dtype, num_blocks=rcfg.num_blocks, mlp_factory=mlp_factory)
        self.lora_projections = lora_projections
        self.rcfg = rcfg
        self.schedule = rcfg.resolved_schedule(cfg.num_layers)
        n = len(self.schedule)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        if rcfg.iteration_embedding:
            self.iter_embed = nn.Parameter(torch.zeros(n, cfg.hidden_size, dtype=params_dtype))
        if rcfg.iteration_norms:
            self.iter_norms = nn.Parameter(torch.ones(n, 2, cfg.hidden_size, dtype=params_dtype))
        r = rcfg.lora_rank
        for name, (fan_in, fan_out) in [(k, v) for k, v in lora_shapes(cfg).items() if k in lora_projections] if r else ():
            # Full-size tensors from the seeded CPU generator, then this rank's slice: the same model at any TP.
            full = {"A": torch.randn(n, r, fan_in) * cfg.init_std, "B": torch.zeros(n, fan_out, r)}
            for part, t in full.items():
                key = f"lora_{name}_{part}"
                layout = tp_layout(key)
                p = nn.Parameter(tp_slice(t, *layout, tp, rank).to(params_dtype) if layout else t.to(params_dtype))
                if layout:
                    set_tensor_model_parallel_attributes(p, True, layout[0], layout[1])
                self.register_parameter(key, p)

    def position(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rcfg.iteration_embedding:
            x = x + self.iter_embed[i]
        norms = (self.iter_norms[i, 0], self.iter_norms[i, 1]) if self.rcfg.iteration_norms else None
        lora = {p: (getattr(self, f"lora_{p}_A")[i], getattr(self, f"lora_{p}_B")[i]) for p in self.lora_projections} \
            if self.rcfg.lora_rank else None
        return self.layers[self.schedule[i]](x, cos, sin, norms, lora, self.mlp_call(i))

    def mlp_call(self, i: int):
        """What replaces the block's own MLP call at position i (None: the block's MLP with its LoRA)."""
        return None

    def hidden_states(self, tokens: torch.Tensor, depth: int = 0, taps: dict | None = None) -> torch.Tensor:
        """Final-normed hidden states after `depth` positions (0: all); `taps[d]` collects the
        un-normed residual stream after each depth d it names."""
        x = self.embed(tokens)
        return self.norm(self.unroll(x, 0, depth or len(self.schedule), taps))

    def unroll(self, x: torch.Tensor, start: int, end: int, taps: dict | None = None) -> torch.Tensor:
        """The residual stream after positions start..end-1 (early-exit decoding continues from a depth)."""
        cos, sin = self.rope(x.shape[1], x.device, x.dtype)
        for i in range(start, end):
            x = self.run_layer(i, self.position, i, x, cos, sin)
            if taps is not None and i + 1 in taps:
                taps[i + 1] = x
        return x

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, select=None,
                loss_mask: torch.Tensor | None = None, depth: int = 0):
        """As the dense model's; `depth` exits early. In training with `recurrent.exit_loss_weights`, each
        exit's per-token loss (same positions as the final one) is added with its weight."""
        weights = self.rcfg.exit_loss_weights
        if labels is None or not self.training or not weights or depth:
            h = self.hidden_states(tokens, depth)
            out = self.readout(h, labels, select)
            self.collect_aux(h, labels, loss_mask if not depth else None)
            return out
        taps = {d: None for d in self.rcfg.exit_depths}
        h = self.hidden_states(tokens, 0, taps)
        out = self.readout(h, labels, select)
        self.collect_aux(h, labels, loss_mask)
        per_token, mask = out if select is not None else (out, None)
        for d, w in zip(self.rcfg.exit_depths, weights):
            early = self.readout(self.norm(taps[d]), labels, select, mask=mask)
            per_token = per_token + float(w) * (early[0] if select is not None else early)
        return (per_token, mask) if select is not None else per_token


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
