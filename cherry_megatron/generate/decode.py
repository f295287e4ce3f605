"""Autoregressive decoding with KV caches: prefill the prompt (in chunks if asked), then one token per pass."""
from __future__ import annotations

import torch

from cherry_megatron.generate.cache import ModelCache, full_logits, run_units
from cherry_megatron.generate.sampling import Sampler


def prefill(model, tokens: torch.Tensor, cache: ModelCache, vocab: int, chunk: int = 0,
            depth: int | None = None, last_only: bool = False) -> torch.Tensor:
    """Logits [b, s, vocab] of every prompt position after `depth` units (None: all), the prompt [b, s]
    appended to the caches in chunks of `chunk` tokens (0: one pass). `last_only`: [b, 1, vocab] of the
    last position alone (what decoding needs; a long prompt's full fp32 logits would be s x vocab)."""
    offset, out = cache.units[0].length, []
    step = chunk or tokens.shape[1]
    for i in range(0, tokens.shape[1], step):
        x = run_units(model, model.embed(tokens[:, i:i + step]), cache, offset + i, 0, depth)
        if not last_only or i + step >= tokens.shape[1]:
            out.append(full_logits(model, x[:, -1:] if last_only else x, vocab))
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, vocab: int, sampler: Sampler,
             eos: int | None = None, chunk: int = 0) -> list[int]:
    """New token ids after `prompt` (up to `max_new_tokens`, ending at `eos` included)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    device = model.embed.weight.device
    cache = ModelCache(model, 1, len(prompt) + max_new_tokens)
    logits = prefill(model, torch.tensor([prompt], device=device), cache, vocab, chunk, last_only=True)[:, -1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = sampler(logits)
        out.append(int(token[0]))
        if out[-1] == eos or len(out) == max_new_tokens:
            break
        x = model.embed(token.view(1, 1))
        logits = full_logits(model, run_units(model, x, cache, cache.units[0].length), vocab)[:, -1]
    return out
