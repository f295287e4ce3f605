"""The next token from logits [b, vocab]: greedy, or temperature + nucleus (top-p) sampling.

Sampling draws from a torch.Generator seeded once per generation, so a seed reproduces the output and every
TP rank (same gathered logits, same generator) draws the same token without a broadcast.
"""
from __future__ import annotations

import torch


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        """temperature 0: greedy (argmax)."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[b] token ids."""
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1:
            # Keep the smallest set of most likely tokens whose mass reaches top_p (the most likely always).
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(dim=-1) - sorted_p >= self.top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).to(logits.device)
