"""Multi-token prediction (DeepSeek-V3): `depth` sequential modules after the main model, module k
predicting the token k+1 places ahead, for any of our models (dense, recurrent, MoEE).

Module k at position j combines the previous depth's hidden state h^{k-1}_j (the main model's final
hidden state for k = 1) with the shared embedding of token j+k: x = W [RMSNorm(h); RMSNorm(emb)], runs
one transformer block (causal, so position j sees tokens up to j+k) and reads out through the main
model's output layer; its target is token j+k+1 = labels[j+k]. The loss is the mean over depths of each
depth's masked mean, weighted by `moee.mtp_weight` in the objective; evaluation never computes it.

megatron-core has an MTP block, but it is built on its TransformerLayer, which needs CUDA (docs/DESIGN.md).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import nn

from cherry_megatron.config import ModelConfig
from cherry_megatron.losses import masked_mean
from cherry_megatron.model.layers import Block, LayerContext, normal_init, parallel_config


def mtp_targets(labels: torch.Tensor, loss_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and validity of depth k (k >= 1): target[j] = labels[j+k]; valid only if j+k is inside
    the sequence and loss_mask is 1 at every position j..j+k. With the EOD mask on, loss_mask is 0 where
    a document ends, so no target lies beyond the document its context is in."""
    b, s = labels.shape
    target = torch.zeros_like(labels)
    mask = torch.zeros(b, s, dtype=torch.bool, device=labels.device)
    if k >= s:
        return target, mask
    target[:, :s - k] = labels[:, k:]
    ok = loss_mask > 0
    window = ok[:, :s - k].clone()
    for m in range(1, k + 1):
        window &= ok[:, m:s - k + m]
    mask[:, :s - k] = window
    return target, mask


def next_inputs(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Token j+k (= labels[j+k-1]) at position j, zero-padded past the end (those positions carry no target)."""
    out = torch.zeros_like(labels)
    out[:, :labels.shape[1] - k + 1] = labels[:, k - 1:]
    return out


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, mp):
        super().__init__()
        h, dtype = cfg.hidden_size, mp.params_dtype
        self.hnorm = nn.RMSNorm(h, eps=cfg.norm_eps, dtype=dtype)
        self.enorm = nn.RMSNorm(h, eps=cfg.norm_eps, dtype=dtype)
        # Replicated on TP ranks: its inputs are whole there, so every rank computes the same gradient.
        self.proj = nn.Linear(2 * h, h, bias=False, dtype=dtype)
        normal_init(cfg.init_std)(self.proj.weight.data)
        self.block = Block(cfg, mp)
        self.norm = nn.RMSNorm(h, eps=cfg.norm_eps, dtype=dtype)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.block(self.proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1)), ctx)


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        mp = parallel_config(parallel_state.get_tensor_model_parallel_world_size(), params_dtype)
        self.depths = nn.ModuleList(MTPModule(cfg, mp) for _ in range(depth))

    def forward(self, h: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, embed: nn.Module,
                token_losses, ctx: LayerContext) -> torch.Tensor:
        """Mean over depths of the masked-mean cross-entropy. The main model lends its embedding, its
        output layer's per-token losses `token_losses(h, labels)` and the pass's RoPE (`ctx`)."""
        losses = []
        for k, module in enumerate(self.depths, start=1):
            h = module(h, embed(next_inputs(labels, k)), ctx)
            target, mask = mtp_targets(labels, loss_mask, k)
            losses.append(masked_mean(token_losses(module.norm(h), target), mask))
        return torch.stack(losses).mean()
