"""A JetMoE-style sparse model (`smoe.num_experts > 0`): every layer is RMSNorm -> Mixture of Attention heads
(MoA) -> residual -> RMSNorm -> mixture of SwiGLU MLP experts -> residual (JetMoE, arXiv 2404.07413).

Both mixtures route each token to its top-k of E experts by fp32 router logits `W_r x`, with gates the softmax
over those k logits only (they sum to 1: at k=1 the gate is 1 and the router learns from its losses alone, as
in JetMoE), dropless by default. Each router adds Switch's load-balancing loss and the z-loss
(`losses.switch_loss`, `losses.z_loss`), the MoA's under names of their own.

- MoA: expert e owns a query projection d -> n_kv*d_h and an output projection n_kv*d_h -> d; one key/value
  projection is shared. A token's k queries attend to the shared keys and values (RoPE on both), and the
  output is sum_i g_i W_o^{e_i}(attn_i) + a shared bias. The expert projections are one grouped, TP-split
  parameter each (heads split over TP ranks, like the dense attention's); experts are not spread over
  expert-parallel ranks (see README "Sparse models").
- MoE MLP: DeepSpeed's MoE layer over SwiGLU experts (model/moee.py `RoutedMLP`: EP, TP, checkpoints), with
  its gate renormalised over the top-k and a shared output bias.

The model is moee.py's routed model with these layers, so pipelines, checkpoints (expert files with global
ids), conversion and resume are that model's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
from torch import nn

from cherry_megatron.config import ModelConfig, RecurrentConfig, SMoEConfig
from cherry_megatron.losses import switch_loss, z_loss
from cherry_megatron.model.gpt import count_parameters
from cherry_megatron.model.layers import apply_rope, keys_values, normal_init
from cherry_megatron.model.moee import MoEEGPT, RoutedMLP
from cherry_megatron.model.tp_layout import mark, tp_slice


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts [N, k], gates [N, k]): each token's k largest logits and the softmax over those k only."""
    top, experts = logits.topk(k, dim=-1)
    return experts, top.softmax(-1)


class Grouping:
    """Tokens' top-k expert slots [N, k] sorted by expert, so each expert's projection is one matmul on its
    rows (JetMoE's map/reduce). The group sizes are read to the host, one sync per MoA layer: a grouped matmul
    that takes sizes on the device is not in torch (megablocks and scattermoe are CUDA kernels)."""

    def __init__(self, experts: torch.Tensor, num_experts: int):
        self.k = experts.shape[-1]
        flat = experts.reshape(-1)
        self.order = flat.argsort(stable=True)  # slot index (token * k + i) of each sorted row
        self.sizes = torch.bincount(flat, minlength=num_experts).tolist()

    def apply(self, rows: torch.Tensor, weight: torch.Tensor, per_slot: bool) -> torch.Tensor:
        """[N * k, out]: slot j's row projected by its expert's `weight[e]` [out, in]; `rows` holds one row per
        token (per_slot False: each is used k times) or one per slot."""
        src = self.order // self.k if not per_slot else self.order
        parts = rows.index_select(0, src).split(self.sizes)
        out = torch.cat([F.linear(part, weight[e]) for e, part in enumerate(parts)])
        return torch.empty_like(out).index_copy(0, self.order, out)


class MixtureOfAttention(nn.Module):
    """JetMoE's MoA on megatron's TP layout: each rank holds n_kv/tp heads of every expert's query and output
    projections (`q_experts` [E, n_kv*d_h/tp, d], `o_experts` [E, d, n_kv*d_h/tp]) and of the shared `kv`."""

    def __init__(self, cfg: ModelConfig, mp, scfg: SMoEConfig):
        super().__init__()
        tp, rank = mp.tensor_model_parallel_size, parallel_state.get_tensor_model_parallel_rank()
        e, h, hd = scfg.num_experts, cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        self.num_experts, self.top_k = e, scfg.top_k
        self.n_kv, self.head_dim = cfg.kv_heads // tp, cfg.head_dim
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        dtype = mp.params_dtype
        # Full tensors from the seeded CPU generator, then this rank's heads: the same model at any TP.
        self.router = nn.Linear(h, e, bias=False, dtype=dtype)
        with torch.no_grad():
            normal_init(std)(self.router.weight)
        q = tp_slice(torch.randn(e, hd, h) * std, 1, 1, tp, rank)
        o = tp_slice(torch.randn(e, h, hd) * out_std, 2, 1, tp, rank)
        self.q_experts = mark(nn.Parameter(q.to(dtype)), (1, 1))
        self.o_experts = mark(nn.Parameter(o.to(dtype)), (2, 1))
        self.kv = ColumnParallelLinear(h, 2 * hd, config=mp, init_method=normal_init(std), bias=False,
                                       gather_output=False, stride=2)
        self.bias = nn.Parameter(torch.zeros(h, dtype=dtype))

    def route(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None):
        """(output, load-balancing loss, z-loss) for the normed stream x [b, s, d]; `cache` as Attention's."""
        b, s, d = x.shape
        k = self.top_k
        flat = x.reshape(-1, d)
        logits = F.linear(flat.float(), self.router.weight.float())
        experts, gates = top_k_gates(logits, k)
        groups = Grouping(experts, self.num_experts)
        # The copy region all-reduces the queries' input gradient over TP (as a column-parallel layer does); the
        # router's path is computed whole on every rank and must not be summed.
        q = groups.apply(copy_to_tensor_model_parallel_region(flat), self.q_experts, per_slot=False)
        # Heads ordered (kv head, slot): query head j reads kv head j // k, SDPA's grouped-query layout.
        q = q.view(b, s, k, self.n_kv, self.head_dim).permute(0, 3, 2, 1, 4).reshape(b, self.n_kv * k, s, -1)
        q = apply_rope(q, cos, sin)
        kk, v = keys_values(self.kv, x, self.n_kv, self.head_dim, cos, sin)
        causal, mask = True, None
        if cache is not None:
            kk, v, mask, causal = cache.attend(kk, v)
        y = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal, enable_gqa=k > 1)
        y = y.view(b, self.n_kv, k, s, self.head_dim).permute(0, 3, 2, 1, 4).reshape(b * s * k, -1)
        # Each slot's output is summed over TP before its gate multiplies it: the gate's gradient needs the
        # whole output (a rank's partial sum would give each rank a different router gradient).
        out = reduce_from_tensor_model_parallel_region(groups.apply(y, self.o_experts, per_slot=True))
        # fp32 gates and sum over the k slots, as DeepSpeed's sparse decode combines the MLP experts under bf16
        out = (out.view(b * s, k, d).float() * gates.unsqueeze(-1)).sum(1).to(out.dtype) + self.bias
        return out.view(b, s, d), switch_loss(logits, k), z_loss(logits)


class SparseMLP(RoutedMLP):
    """DeepSpeed's MoE layer over SwiGLU experts with JetMoE's gates (renormalised over the top-k; DeepSpeed's
    top-1 gate is the full softmax's probability), a shared output bias, and the Switch and z losses."""

    def __init__(self, cfg: ModelConfig, scfg: SMoEConfig, positions: int, lora_rank: int, dtype: torch.dtype):
        super().__init__(cfg, scfg, positions, lora_rank, dtype)
        self.top_k = scfg.top_k
        gate = self.deepspeed_moe.gate
        gate.__class__ = _renormalised(type(gate))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size, dtype=dtype))

    def route(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self.at_position(position):
            out, _, _ = self(x)
        logits = self.router_logits(x)
        return out + self.bias, switch_loss(logits, self.top_k), z_loss(logits)


_GATES: dict = {}


def _renormalised(gate_type: type) -> type:
    """`gate_type` (DeepSpeed's TopKGate, or compat's TP-padded one) with each token's gates divided by their
    sum over its k routes: the softmax over the top-k logits (k=2 already is; k=1 becomes 1)."""
    if gate_type not in _GATES:
        def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
            out = gate_type.forward(self, input, used_token, sparse_routes, use_tutel)
            if not sparse_routes:
                raise RuntimeError("this DeepSpeed MoE layer does not route sparsely: its gates cannot be renormalised")
            l_aux, capacity, e, indices, locations, gates, counts = out
            gates = gates / gates.sum(0, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
            return l_aux, capacity, e, indices, locations, gates, counts

        _GATES[gate_type] = type(f"Renormalised{gate_type.__name__}", (gate_type,), {"forward": forward})
    return _GATES[gate_type]


class SMoEGPT(MoEEGPT):
    """The sparse model: moee.py's routed model (each layer its own block, no per-position parameters) with
    `SparseMLP`s and, with `smoe.attention_experts`, `MixtureOfAttention` in place of the dense attention."""
    mlp_type = SparseMLP
    lora_projections = ()

    def __init__(self, cfg: ModelConfig, scfg: SMoEConfig, params_dtype=torch.float32, **options):
        attn = (lambda mp: MixtureOfAttention(cfg, mp, scfg)) if scfg.attention_experts else None
        super().__init__(cfg, RecurrentConfig(), scfg, params_dtype, attn_factory=attn, **options)


def count_smoe_parameters(cfg: ModelConfig, scfg: SMoEConfig) -> dict:
    """Analytic count: `total` stored, `active` used per token (k of E experts in each mixture; the embedding,
    tied or not, counted once), `active_non_embedding` without the input embedding."""
    h, f, e, k = cfg.hidden_size, cfg.ffn_size, scfg.num_experts, scfg.top_k
    hd = cfg.kv_heads * cfg.head_dim
    dense = count_parameters(cfg)
    if scfg.attention_experts:
        attn_expert, attn_shared = 2 * h * hd, e * h + 2 * h * hd + h  # q + o; router, kv, bias
        attn, attn_active = e * attn_expert + attn_shared, k * attn_expert + attn_shared
    else:
        attn = attn_active = h * cfg.num_heads * cfg.head_dim * 2 + 2 * h * hd
    mlp_expert, mlp_shared = 3 * h * f, e * h + h
    mlp, mlp_active = e * mlp_expert + mlp_shared, k * mlp_expert + mlp_shared
    per_layer, per_layer_active = attn + mlp + 2 * h, attn_active + mlp_active + 2 * h
    rest = dense["embedding"] + dense["head"] + h
    total, active = cfg.num_layers * per_layer + rest, cfg.num_layers * per_layer_active + rest
    return {"per_layer": per_layer, "attention": attn, "mlp": mlp, "layers": cfg.num_layers * per_layer,
            "embedding": dense["embedding"], "head": dense["head"], "total": total, "active": active,
            "active_non_embedding": active - dense["embedding"]}


def smoe_flops_per_token(cfg: ModelConfig, scfg: SMoEConfig, seq_length: int) -> float:
    """Training FLOPs per token as model/gpt.py's flops_per_token counts them (6N + 12 L H S): N the active
    weights of the layers (k experts of each mixture, routers and shared parts) plus the output layer, H the
    query width a token attends with (k MoA experts' heads, or the dense attention's)."""
    n = count_smoe_parameters(cfg, scfg)
    h = cfg.hidden_size
    layers_active = n["active"] - n["embedding"] - n["head"] - h  # less the final norm, as count_smoe adds it
    width = scfg.top_k * cfg.kv_heads * cfg.head_dim if scfg.attention_experts else cfg.num_heads * cfg.head_dim
    return 6.0 * (layers_active + cfg.vocab_size * h) + 12.0 * cfg.num_layers * width * seq_length
