"""KV caches for generation, and the cached pass over a model's layer units.

One `KVCache` per layer unit, not per block: a recurrent model's positions share a block's weights but
differ by their LoRA, norms and iteration embedding, so each position writes keys and values of its own.
Caches are preallocated for the whole generation (no reallocation per token) and hold this TP rank's KV
heads. A pass appends the chunk's keys/values to every unit it runs; `crop` forgets the tail (a rejected
speculative draft), so the next pass rewrites it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class KVCache:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's k, v [b, heads, s, d] after what is held; returns every key and value held."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, k: torch.Tensor, v: torch.Tensor):
        """(keys, values, attn_mask, is_causal) for SDPA once the chunk's k, v are stored. SDPA's is_causal
        masks upper-left aligned: right for a chunk that starts the cache, wrong for one over a non-empty
        cache (query i sits at start + i), which gets an explicit mask. One new token sees everything."""
        start, s = self.length, k.shape[2]
        k, v = self.append(k, v)
        if start == 0 or s == 1:
            return k, v, None, start == 0
        mask = torch.arange(start + s, device=k.device) <= torch.arange(start, start + s, device=k.device)[:, None]
        return k, v, mask, False

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)


class ModelCache:
    """The caches of every layer unit of `model` for `batch` sequences of up to `max_len` tokens."""

    def __init__(self, model, batch: int, max_len: int):
        attn = model.layers[0].attn
        ref = model.embed.weight
        self.units = [KVCache(batch, attn.n_kv, max_len, attn.head_dim, ref.dtype, ref.device)
                      for _ in model.units()]

    def __len__(self) -> int:
        return len(self.units)

    def lengths(self) -> list[int]:
        return [c.length for c in self.units]

    def crop(self, length: int, start: int = 0, end: int | None = None) -> None:
        for c in self.units[start:end]:
            c.crop(length)


def run_units(model, x: torch.Tensor, cache: ModelCache, offset: int, start: int = 0,
              end: int | None = None) -> torch.Tensor:
    """The residual stream after units start..end-1 of `x` [b, s, h], the stream of tokens at positions
    offset..offset+s-1, appending to those units' caches (each must hold exactly `offset` positions)."""
    end = len(cache) if end is None else end
    for i in range(start, end):
        if cache.units[i].length != offset:
            raise AssertionError(f"unit {i}'s cache holds {cache.units[i].length} positions, the pass starts at {offset}")
    return model.unroll(x, model.context(x, offset, cache.units), start, end)


def full_logits(model, x: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 logits over the tokenizer's `vocab` (the padded rows never win) from an un-normed stream; the
    vocab-parallel slices are gathered over TP so every rank chooses the same token."""
    logits = model.logits(model.final_norm(x))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        # torch's all_gather, not megatron's gather_from_tensor_model_parallel_region: that one allocates on
        # torch.cuda.current_device(), which a CPU (gloo) run has not.
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab].float()
