"""Transformer building blocks on megatron-core's tensor-parallel linear layers.

Megatron-core's own attention, RoPE and GPTModel call torch.cuda unconditionally (DESIGN.md), so the
blocks are ours; all matrix work that is split over tensor-parallel ranks goes through
`ColumnParallelLinear` / `RowParallelLinear`, which own the TP communication.

Weights are initialised on the CPU from one full-size master tensor and then split
(`use_cpu_initialization`), so a model built at TP=2 holds exactly the slices of the TP=1 model built
from the same seed. Fused projections (k|v, gate|up) use megatron's `stride=2` so each rank holds
its own k and v (gate and up) slices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from cherry_megatron.config import ModelConfig


def normal_init(std: float):
    def init(w: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(w, mean=0.0, std=std)
    return init


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention of Hugging Face Llama, so exported q/k weights need no permutation."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads // tp, cfg.kv_heads // tp, cfg.head_dim
        init = normal_init(cfg.init_std)
        out_init = normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        h, kv_out = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        self.q = ColumnParallelLinear(h, cfg.num_heads * cfg.head_dim, config=mp, init_method=init,
                                      bias=False, gather_output=False)
        self.kv = ColumnParallelLinear(h, 2 * kv_out, config=mp, init_method=init, bias=False,
                                       gather_output=False, stride=2)
        self.o = RowParallelLinear(cfg.num_heads * cfg.head_dim, h, config=mp, init_method=out_init,
                                   bias=False, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, _ = self.q(x)
        kv, _ = self.kv(x)
        k, v = kv.chunk(2, dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        out, _ = self.o(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        init = normal_init(cfg.init_std)
        out_init = normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_size, config=mp, init_method=init,
                                            bias=False, gather_output=False, stride=2)
        self.down = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, config=mp, init_method=out_init,
                                      bias=False, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu, _ = self.gate_up(x)
        gate, up = gu.chunk(2, dim=-1)
        out, _ = self.down(F.silu(gate) * up)
        return out


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=mp.params_dtype)
        self.attn = Attention(cfg, mp)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=mp.params_dtype)
        self.mlp = SwiGLU(cfg, mp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# How each tensor-parallel weight is split: (dim, stride). Everything else is replicated.
# Kept beside the layers so that checkpoint consolidation and the layers cannot drift apart.
TP_LAYOUT = {
    "embed.weight": (0, 1),
    "head.weight": (0, 1),
    "attn.q.weight": (0, 1),
    "attn.kv.weight": (0, 2),
    "attn.o.weight": (1, 1),
    "mlp.gate_up.weight": (0, 2),
    "mlp.down.weight": (1, 1),
}


def tp_layout(name: str):
    for suffix, layout in TP_LAYOUT.items():
        if name == suffix or name.endswith("." + suffix):
            return layout
    return None
