"""Structured pruning of a full (TP=1) state dict: keep chosen MLP neurons, attention heads, hidden channels and
layers, slicing every tensor that reads or writes them so the smaller model computes the same function of the
kept parts. Index lists may also reorder (a permutation keeps the model's function: tests/test_prune.py).

Per layer: gate_up [2f, h] keeps rows idx and f + idx, down [h, f] columns idx; q [H hd, h] keeps the rows of
the kept heads, o [h, H hd] their columns; k|v are kept whole (GQA: every KV group stays, prune.py keeps each
group's best query heads so head h still reads group h // (H / G)). Hidden channels slice the embedding and head
columns, every norm weight, the input columns of q, kv, gate_up and the output rows of o and down. A recurrent
model's per-position parameters follow the block each position runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from cherry_megatron.errors import ConfigError


@dataclass
class Keep:
    """What to keep (None: everything, in order): ffn[i] / heads[i] per block, hidden channels, dense layers."""
    ffn: list[torch.Tensor] | None = None
    heads: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None
    layers: list[int] | None = None


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scored indices, in their original order (ties: the lower index)."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return order.sort().values


def top_heads(scores: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """GQA: the k / groups best query heads of every KV group (heads of group g are g q .. (g + 1) q - 1);
    multi-head attention is one group (its heads leave with their K and V)."""
    if k % groups:
        raise ConfigError(f"--target-heads {k} must be a multiple of the {groups} KV groups (every group keeps "
                          "the same number of query heads)")
    per = scores.numel() // groups
    return torch.cat([g * per + top_k(scores[g * per:(g + 1) * per], k // groups) for g in range(groups)])


def _expand(heads: torch.Tensor, hd: int) -> torch.Tensor:
    """Head indices -> the row indices of their hd channels."""
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def _index(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx)


def _projection_indices(cfg, keep: Keep, block: int) -> dict[str, tuple]:
    """projection -> (kept input indices, kept output indices), None for all, of one block."""
    m = cfg.model
    f, hd = m.ffn_size, m.head_dim
    heads = None if keep.heads is None else _expand(keep.heads[block], hd)
    kv = None
    if heads is not None and m.kv_heads == m.num_heads:  # multi-head attention: a head goes with its K and V
        kv = torch.cat([heads, m.kv_heads * hd + heads])
    ffn = None if keep.ffn is None else keep.ffn[block]
    gate_up = None if ffn is None else torch.cat([ffn, f + ffn])
    h = keep.hidden
    return {"q": (h, heads), "kv": (h, kv), "o": (heads, h), "gate_up": (h, gate_up), "down": (ffn, h)}


WEIGHTS = {"q": "attn.q.weight", "kv": "attn.kv.weight", "o": "attn.o.weight", "gate_up": "mlp.gate_up.weight",
           "down": "mlp.down.weight"}


def prune_state(state: dict[str, torch.Tensor], cfg, keep: Keep) -> tuple[dict[str, torch.Tensor], object]:
    """(pruned state dict, its config) for a dense or recurrent model's full state dict."""
    m, r = cfg.model, cfg.recurrent
    if cfg.moee.num_experts or cfg.smoe.num_experts or cfg.moee.mtp_depth:
        raise ConfigError("pruning takes dense and recurrent models; a routed or multi-token-prediction one is not "
                          "built (tools/prune_experts.py removes experts)")
    blocks = r.num_blocks or m.num_layers
    if keep.layers is not None and r.num_blocks:
        raise ConfigError("a recurrent model prunes in width only (its depth is shared blocks: --target-layers "
                          "is the dense model's, before tools/compress_depth.py)")
    hidden = keep.hidden
    out: dict[str, torch.Tensor] = {}
    layers = keep.layers if keep.layers is not None else list(range(blocks))
    for new, old in enumerate(layers):
        idx = _projection_indices(cfg, keep, old)
        for p, name in WEIGHTS.items():
            w = state[f"layers.{old}.{name}"]
            out[f"layers.{new}.{name}"] = _index(_index(w, 0, idx[p][1]), 1, idx[p][0])
        for norm in ("attn_norm.weight", "mlp_norm.weight"):
            out[f"layers.{new}.{norm}"] = _index(state[f"layers.{old}.{norm}"], 0, hidden)
    for name in ("embed.weight", "head.weight"):
        if name in state:
            out[name] = _index(state[name], 1, hidden)
    out["norm.weight"] = _index(state["norm.weight"], 0, hidden)
    if r.num_blocks:
        out.update(_per_position(state, cfg, keep))
    # Every source tensor must be sliced or belong to a dropped layer: a new kind of tensor is an error, not lost
    read = {f"layers.{i}.{n}" for i in range(blocks) for n in (*WEIGHTS.values(), "attn_norm.weight", "mlp_norm.weight")}
    unknown = sorted(set(state) - read - set(out))
    if unknown:
        raise ConfigError(f"pruning does not know how to slice {unknown[0]} ({len(unknown)} such tensors)")
    return out, _pruned_config(cfg, keep, len(layers))


def _per_position(state: dict[str, torch.Tensor], cfg, keep: Keep) -> dict[str, torch.Tensor]:
    """Iteration embeddings and norms (hidden channels) and each position's LoRA, sliced like its block."""
    out = {}
    schedule = cfg.recurrent.resolved_schedule(cfg.model.num_layers)
    if "iter_embed" in state:
        out["iter_embed"] = _index(state["iter_embed"], 1, keep.hidden)
    if "iter_norms" in state:
        out["iter_norms"] = _index(state["iter_norms"], 2, keep.hidden)
    for p in WEIGHTS:
        if f"lora_{p}_A" not in state:
            continue
        a, b = state[f"lora_{p}_A"], state[f"lora_{p}_B"]  # [n, r, in], [n, out, r]
        rows = [_projection_indices(cfg, keep, blk)[p] for blk in schedule]
        out[f"lora_{p}_A"] = torch.stack([_index(a[i], 1, rows[i][0]) for i in range(len(schedule))])
        out[f"lora_{p}_B"] = torch.stack([_index(b[i], 0, rows[i][1]) for i in range(len(schedule))])
    return out


def _pruned_config(cfg, keep: Keep, num_layers: int):
    small = copy.deepcopy(cfg)
    m, hd = small.model, cfg.model.head_dim
    if keep.ffn is not None:
        m.ffn_hidden_size = int(keep.ffn[0].numel())
    if keep.heads is not None:
        kept = int(keep.heads[0].numel())
        m.num_kv_heads = kept if cfg.model.kv_heads == cfg.model.num_heads else cfg.model.kv_heads
        m.num_heads = kept
    if keep.hidden is not None:
        m.hidden_size = int(keep.hidden.numel())
    if keep.layers is not None:
        m.num_layers = num_layers
    m.kv_channels = hd if m.hidden_size % m.num_heads or m.hidden_size // m.num_heads != hd else 0
    m.init_from = ""
    return small
