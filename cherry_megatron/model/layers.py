"""Transformer building blocks on megatron-core's tensor-parallel linear layers.

Megatron-core's own attention, RoPE and GPTModel call torch.cuda unconditionally (docs/DESIGN.md), so the
blocks are ours; all matrix work that is split over tensor-parallel ranks goes through
`ColumnParallelLinear` / `RowParallelLinear`, which own the TP communication.

Weights are initialised on the CPU from one full-size master tensor and then split
(`use_cpu_initialization`), so a model built at TP=2 holds exactly the slices of the TP=1 model built
from the same seed. Fused projections (k|v, gate|up) use megatron's `stride=2` so each rank holds
its own k and v (gate and up) slices; megatron's attributes on each weight say how it is split
(model/tp_layout.py reads them).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
from torch import nn

from cherry_megatron.config import ModelConfig


def parallel_config(tp: int, params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    # CPU initialisation on every device keeps the weights independent of the TP degree (see above).
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               params_dtype=params_dtype, perform_initialization=True)


def normal_init(std: float):
    def init(w: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(w, mean=0.0, std=std)
    return init


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention of Hugging Face Llama, so exported q/k weights need no permutation.

    The frequencies are no buffer: a bf16 cast of the module (a user's `.to(bfloat16)`, DeepSpeed's below
    0.19.2) would round them, up to ~0.9 rad of phase by position 2048, and the model would disagree with its
    export. They are computed in fp32 here, and cos/sin cached per (length, device, dtype)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._cache: dict = {}

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype, offset: int = 0):
        """cos/sin of positions offset..offset+seq_len-1. With an offset (a KV-cached step) the table is built
        for a power-of-two length and sliced, so decoding does not build one per step; each entry is the
        same product t * inv_freq whatever the table's length, so the values do not depend on it."""
        n = offset + seq_len
        length = n if not offset else 1 << (n - 1).bit_length()
        key = (length, str(device), dtype)
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
            t = torch.arange(length, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            if len(self._cache) >= 8:  # a few lengths (training, evaluation's last window), not one per step
                self._cache.clear()
            self._cache[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        cos, sin = self._cache[key]
        return (cos, sin) if length == seq_len else (cos[offset:n], sin[offset:n])


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
        out = out + _low_rank(copy_to_tensor_model_parallel_region(_low_rank(x, a)), b)
    return out


def row(linear: RowParallelLinear, x: torch.Tensor, lora=None) -> torch.Tensor:
    """A row-parallel projection (input split over TP) plus B·A·x: A [r, in/tp] split like the weight's
    columns, its partial products summed over TP; B [out, r] replicated."""
    out, _ = linear(x)
    if lora is not None:
        a, b = lora
        out = out + _low_rank(reduce_from_tensor_model_parallel_region(_low_rank(x, a)), b)
    return out


def _low_rank(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T; `w` [rows, out, in] holds one factor per row of x (depth-wise batching gathers each row's
    position's LoRA: a batched matmul, as Punica's kernels do for many adapters)."""
    return F.linear(x, w) if w.dim() == 2 else torch.matmul(x, w.transpose(-1, -2))


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora=None, cache=None) -> torch.Tensor:
        """`cache` (generate/cache.py `KVCache`): this chunk's keys and values are appended to it and the
        queries attend to everything it holds."""
        lora = lora or {}
        b, s, _ = x.shape
        q = column(self.q, x, lora.get("q")).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.keys_values(x, cos, sin, lora.get("kv"))
        causal, mask = True, None
        if cache is not None:
            k, v, mask, causal = cache.attend(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return row(self.o, y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim), lora.get("o"))


    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora=None):
        """k (RoPE'd) and v [b, kv heads, s, head dim] of the normed stream x; `lora` the kv projection's."""
        return keys_values(self.kv, x, self.n_kv, self.head_dim, cos, sin, lora)


def keys_values(kv: ColumnParallelLinear, x: torch.Tensor, n_kv: int, head_dim: int, cos: torch.Tensor,
                sin: torch.Tensor, lora=None):
    """RoPE'd keys and values [b, n_kv, s, head_dim] of a fused k|v projection `kv` (this rank's heads): the
    dense attention's, and the shared ones of a Mixture of Attention heads (smoe.py)."""
    b, s, _ = x.shape
    k, v = column(kv, x, lora).chunk(2, dim=-1)
    k = k.reshape(b, s, n_kv, head_dim).transpose(1, 2)
    v = v.reshape(b, s, n_kv, head_dim).transpose(1, 2)
    return apply_rope(k, cos, sin), v


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


class LayerContext:
    """What the layer units of one forward pass share: RoPE's cos/sin for the sequence, the auxiliary
    terms routed layers produce (`add_aux`), and in generation the KV caches (`caches[unit index]`, the
    chunk's tokens at positions offset.. of every cache the pass appends to). A pipeline stage's context
    attaches the auxiliary terms to the gradient instead (model/pipeline.py)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, caches=None):
        self.cos, self.sin, self.caches = cos, sin, caches
        self.aux: dict[str, list] = {}

    def cache(self, unit: int):
        return self.caches[unit] if self.caches is not None else None

    def add_aux(self, out: torch.Tensor, name: str, term: torch.Tensor) -> torch.Tensor:
        """Record `term` (a scalar with gradient) under `name`; returns `out`, the stream it came with."""
        self.aux.setdefault(name, []).append(term)
        return out


class PositionParams(NamedTuple):
    """What one position of a recurrent model adds to its shared block (model/recurrent.py)."""
    embed: torch.Tensor | None  # iteration embedding added to the residual stream
    norms: tuple | None  # (attention norm weight, MLP norm weight) in place of the block's
    lora: dict | None  # {projection: (A, B)} low-rank deltas
    expert_position: int  # which of a routed block's runs this is: the row of its experts' LoRA stacks


def position_params(holder: nn.Module, row: int, rcfg, projections, expert_position: int) -> PositionParams:
    """Row `row` of the per-position stacks `holder` registers (`iter_embed`, `iter_norms`, `lora_<p>_A/B`):
    the recurrent model itself, or a pipeline stage holding the rows of one block's positions."""
    embed = holder.iter_embed[row] if rcfg.iteration_embedding else None
    norms = (holder.iter_norms[row, 0], holder.iter_norms[row, 1]) if rcfg.iteration_norms else None
    lora = {p: (getattr(holder, f"lora_{p}_A")[row], getattr(holder, f"lora_{p}_B")[row]) for p in projections} \
        if rcfg.lora_rank else None
    return PositionParams(embed, norms, lora, expert_position)


def position_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with a position's weight: [h], or [rows, 1, h] when every row is at its own position."""
    if weight.dim() == 1:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return F.rms_norm(x, x.shape[-1:], None, eps) * weight


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, mlp: nn.Module | None = None,
                 attn: nn.Module | None = None):
        """`mlp` replaces the SwiGLU (a routed mixture of experts in model/moee.py: it has `route`), `attn`
        the attention (a Mixture of Attention heads, model/smoe.py: it has `route` too)."""
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=mp.params_dtype)
        self.attn = attn if attn is not None else Attention(cfg, mp)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=mp.params_dtype)
        self.mlp = mlp if mlp is not None else SwiGLU(cfg, mp)

    def forward(self, x: torch.Tensor, ctx: LayerContext, pos: PositionParams | None = None,
                cache=None) -> torch.Tensor:
        """`pos` adds to or overrides the block's own weights for one position of a recurrent model;
        `cache` is this unit's KV cache in generation."""
        lora = pos.lora if pos is not None else None
        if pos is not None and pos.embed is not None:
            x = x + pos.embed
        a = self.attn_norm(x) if pos is None or pos.norms is None else position_norm(x, pos.norms[0], self.attn_norm.eps)
        if hasattr(self.attn, "route"):
            y, l_aux, z = self.attn.route(a, ctx.cos, ctx.sin, cache)
            x = x + ctx.add_aux(ctx.add_aux(y, "moa_load_balance_loss", l_aux), "moa_z_loss", z)
        else:
            x = x + self.attn(a, ctx.cos, ctx.sin, lora, cache)
        m = self.mlp_norm(x) if pos is None or pos.norms is None else position_norm(x, pos.norms[1], self.mlp_norm.eps)
        if not hasattr(self.mlp, "route"):
            return x + self.mlp(m, lora)
        out, l_aux, z = self.mlp.route(m, pos.expert_position if pos is not None else 0)
        return x + ctx.add_aux(ctx.add_aux(out, "load_balance_loss", l_aux), "router_z_loss", z)


class LayerUnit(NamedTuple):
    """One step of a model's depth: position `index` runs block `block` (shared by several units in a
    recurrent model); `call(x, ctx, cache=None)` maps the residual stream."""
    index: int
    block: int
    call: Callable


def output_logits(head: nn.Module, h: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Vocab-parallel logits (each TP rank holds its slice of the vocabulary); `tied_weight` is the
    embedding's when the output layer shares it."""
    return head(h, weight=tied_weight)[0]
