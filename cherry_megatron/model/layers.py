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

import fnmatch
import math

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
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


def column(linear: ColumnParallelLinear, x: torch.Tensor, lora=None) -> torch.Tensor:
    """A column-parallel projection, plus a low-rank delta B·A·x when `lora=(A, B)` is given: A [r, in]
    is replicated, B [out/tp, r] split like the weight's rows; the copy region all-reduces A's input
    gradient over TP as the column layer does for its own."""
    out, _ = linear(x)
    if lora is not None:
        a, b = lora
        out = out + F.linear(copy_to_tensor_model_parallel_region(F.linear(x, a)), b)
    return out


def row(linear: RowParallelLinear, x: torch.Tensor, lora=None) -> torch.Tensor:
    """A row-parallel projection (input split over TP) plus B·A·x: A [r, in/tp] split like the weight's
    columns, its partial products summed over TP; B [out, r] replicated."""
    out, _ = linear(x)
    if lora is not None:
        a, b = lora
        out = out + F.linear(reduce_from_tensor_model_parallel_region(F.linear(x, a)), b)
    return out


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora=None) -> torch.Tensor:
        lora = lora or {}
        b, s, _ = x.shape
        q = column(self.q, x, lora.get("q"))
        kv = column(self.kv, x, lora.get("kv"))
        k, v = kv.chunk(2, dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return row(self.o, y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim), lora.get("o"))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        init = normal_init(cfg.init_std)
        out_init = normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_size, config=mp, init_method=init,
                                            bias=False, gather_output=False, stride=2)
        self.down = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, config=mp, init_method=out_init,
                                      bias=False, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        lora = lora or {}
        gate, up = column(self.gate_up, x, lora.get("gate_up")).chunk(2, dim=-1)
        return row(self.down, F.silu(gate) * up, lora.get("down"))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, mlp: nn.Module | None = None):
        """`mlp` replaces the SwiGLU (a routed mixture of experts in model/moee.py)."""
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=mp.params_dtype)
        self.attn = Attention(cfg, mp)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=mp.params_dtype)
        self.mlp = mlp if mlp is not None else SwiGLU(cfg, mp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norms=None, lora=None,
                mlp=None) -> torch.Tensor:
        """`norms` (attn_weight, mlp_weight) and `lora` ({proj: (A, B)}) override or add to the block's own
        weights for one iteration of a recurrent model; `mlp` (a function of the normed stream) replaces
        the call of the block's MLP."""
        if norms is None:
            a = self.attn_norm(x)
        else:
            a = F.rms_norm(x, x.shape[-1:], norms[0], self.attn_norm.eps)
        x = x + self.attn(a, cos, sin, lora)
        m = self.mlp_norm(x) if norms is None else F.rms_norm(x, x.shape[-1:], norms[1], self.mlp_norm.eps)
        return x + (self.mlp(m, lora) if mlp is None else mlp(m))


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
    # per-position LoRA of recurrent.py, stacked [positions, ...]: B of column layers, A of row layers
    "lora_q_B": (1, 1),
    "lora_kv_B": (1, 2),
    "lora_gate_up_B": (1, 2),
    "lora_o_A": (2, 1),
    "lora_down_A": (2, 1),
    # routed experts (moee.py): the SwiGLU's own layout, and per-position LoRA stacks named after their projection
    "deepspeed_experts.*.gate_up.weight": (0, 2),
    "deepspeed_experts.*.down.weight": (1, 1),
    "gate_up_lora_B": (1, 2),
    "down_lora_A": (2, 1),
}


def tp_slice(t: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s slice of a full tensor split over `tp` ranks along `dim`; a strided weight holds
    `stride` interleaved blocks per rank (e.g. [k_r; v_r])."""
    if tp == 1:
        return t
    blocks = torch.chunk(t, stride, dim=dim)
    return torch.cat([torch.chunk(b, tp, dim=dim)[rank] for b in blocks], dim=dim).clone()


def tp_merge(slices: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from its TP slices (rank order): the inverse of `tp_slice`."""
    blocks = [torch.chunk(s, stride, dim=dim) for s in slices]
    return torch.cat([b[i] for i in range(stride) for b in blocks], dim=dim)


def tp_layout(name: str):
    """The (dim, stride) of a parameter name by its suffix in TP_LAYOUT (`*` as in fnmatch: any characters)."""
    for suffix, layout in TP_LAYOUT.items():
        if name == suffix or fnmatch.fnmatchcase(name, "*." + suffix) or fnmatch.fnmatchcase(name, suffix):
            return layout
    return None
