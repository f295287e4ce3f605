"""Minitron's importance scores (arXiv 2407.14679, section 2.2) from forward passes over calibration samples.

Width: an activation is reduced per sample to the mean over the sequence of its magnitude, then over the
samples to the L2 norm (the aggregation the paper found best). Running sums of the squared per-sample means
are kept, so the scores do not depend on how the samples are batched.
  MLP neuron j of layer i   the input of layer i's down projection, channel j;
  head h of layer i         the attention output before the output projection, head h's vector (its L2 norm
                            is the head's magnitude at a position);
  hidden channel c          the outputs of every RMSNorm of every layer, channel c, the L2-over-samples scores
                            of the norms summed.
Depth: block importance BI_i = 1 - mean over positions of cos(x_in, x_out) of layer i (arXiv 2403.03853);
`loss` instead measures the held-out loss increase when layer i alone is skipped.
A recurrent model's shared block is hooked once per position it runs at: each run counts as more samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cherry_megatron.errors import ConfigError

IMPORTANCE = ("minitron", "random", "magnitude")
DEPTH_IMPORTANCE = ("bi", "loss")


@dataclass
class Scores:
    """Per-block importance: ffn[i] [f], heads[i] [H], hidden [h] (summed over layers), depth [L]."""
    ffn: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    depth: torch.Tensor | None = None


def calibration_batches(stream: np.ndarray, seq_length: int, samples: int, batch_size: int,
                        vocab_size: int = 0) -> list[torch.Tensor]:
    """The first `samples` windows of `seq_length` tokens of `stream`, `batch_size` per batch; with `vocab_size`,
    a token the model has no embedding for is one error (the embedding's IndexError is a traceback)."""
    if samples < 1:
        raise ConfigError(f"--calib-samples must be at least 1, got {samples}")
    if len(stream) < samples * seq_length:
        raise ConfigError(f"the calibration data holds {len(stream):,} tokens, fewer than --calib-samples {samples} x "
                          f"seq_length {seq_length}")
    windows = torch.from_numpy(np.asarray(stream[:samples * seq_length], dtype=np.int64)).view(samples, seq_length)
    if vocab_size and int(windows.max()) >= vocab_size:
        raise ConfigError(f"the calibration data holds token id {int(windows.max())}, outside the model's vocabulary "
                          f"of {vocab_size}: tokenize it with the model's tokenizer")
    return list(windows.split(batch_size))


class _Accumulator:
    """Sum over samples of (mean over the sequence of |activation|)^2, per channel."""

    def __init__(self):
        self.sq: torch.Tensor | None = None

    def add(self, per_position: torch.Tensor) -> None:  # [b, s, channels], already magnitudes
        m = per_position.double().mean(dim=1)
        s = (m * m).sum(dim=0)
        self.sq = s if self.sq is None else self.sq + s

    def l2(self) -> torch.Tensor:
        return self.sq.sqrt()


@torch.no_grad()
def activation_scores(model, batches: list[torch.Tensor]) -> Scores:
    """Minitron's width and BI depth scores of a full (TP=1) model on calibration batches."""
    blocks = list(model.layers)
    ffn = [_Accumulator() for _ in blocks]
    heads = [_Accumulator() for _ in blocks]
    norms = [_Accumulator() for _ in range(2 * len(blocks))]
    cos_sum = torch.zeros(len(model.units()), dtype=torch.float64)
    count = torch.zeros(len(model.units()), dtype=torch.float64)
    hooks = []
    for i, block in enumerate(blocks):
        n_heads, hd = block.attn.n_heads, block.attn.head_dim
        hooks.append(block.mlp.down.register_forward_pre_hook(lambda m, a, i=i: ffn[i].add(a[0].abs())))
        hooks.append(block.attn.o.register_forward_pre_hook(
            lambda m, a, i=i, n=n_heads, d=hd: heads[i].add(a[0].unflatten(-1, (n, d)).norm(dim=-1))))
        hooks.append(block.attn_norm.register_forward_hook(lambda m, a, out, i=i: norms[2 * i].add(out.abs())))
        hooks.append(block.mlp_norm.register_forward_hook(lambda m, a, out, i=i: norms[2 * i + 1].add(out.abs())))
    try:
        model.eval()
        for tokens in batches:
            x = model.embed(tokens)
            ctx = model.context(x)
            for unit in model.units():
                y = unit.call(x, ctx)
                cos_sum[unit.index] += F.cosine_similarity(x.double(), y.double(), dim=-1).sum()
                count[unit.index] += x.shape[0] * x.shape[1]
                x = y
    finally:
        for h in hooks:
            h.remove()
    # A recurrent position's own norm weights stand in for its block's norm modules, whose hooks then never run:
    # no hidden-channel scores (prune.py refuses --target-hidden for such a model).
    hidden = torch.stack([a.l2() for a in norms]).sum(0) if all(a.sq is not None for a in norms) else None
    return Scores(ffn=[a.l2() for a in ffn], heads=[a.l2() for a in heads], hidden=hidden, depth=1 - cos_sum / count)


@torch.no_grad()
def loss_depth_scores(model, batches: list[torch.Tensor]) -> torch.Tensor:
    """Per layer: mean next-token loss on the batches with that layer alone skipped, minus the full model's."""
    from cherry_megatron.losses import token_losses

    model.eval()

    def loss(skip: int) -> float:
        total, n = 0.0, 0
        for tokens in batches:
            x = model.embed(tokens)
            ctx = model.context(x)
            for unit in model.units():
                if unit.index != skip:
                    x = unit.call(x, ctx)
            per = token_losses(model.logits(model.final_norm(x))[:, :-1], tokens[:, 1:])
            total, n = total + per.double().sum().item(), n + per.numel()
        return total / n

    base = loss(-1)
    return torch.tensor([loss(i) - base for i in range(len(model.units()))], dtype=torch.float64)


def weight_scores(state: dict[str, torch.Tensor], cfg) -> Scores:
    """`magnitude`: the weights that write each channel: neuron j the L2 norm of down[:, j], head h that of its
    output-projection columns, hidden channel c the embedding's column c, layer i its o and down projections'."""
    m, n = cfg.model, cfg.recurrent.num_blocks or cfg.model.num_layers
    hd = m.head_dim
    ffn = [state[f"layers.{i}.mlp.down.weight"].double().norm(dim=0) for i in range(n)]
    heads = [state[f"layers.{i}.attn.o.weight"].double().unflatten(1, (m.num_heads, hd)).norm(dim=(0, 2))
             for i in range(n)]
    depth = torch.stack([state[f"layers.{i}.attn.o.weight"].double().norm() ** 2 +
                         state[f"layers.{i}.mlp.down.weight"].double().norm() ** 2 for i in range(n)]).sqrt()
    return Scores(ffn=ffn, heads=heads, hidden=state["embed.weight"].double().norm(dim=0), depth=depth)


def random_scores(state: dict[str, torch.Tensor], cfg, seed: int) -> Scores:
    """`random`: the control; seeded, so two runs prune the same channels."""
    g = torch.Generator().manual_seed(seed)
    m, n = cfg.model, cfg.recurrent.num_blocks or cfg.model.num_layers
    return Scores(ffn=[torch.rand(m.ffn_size, generator=g, dtype=torch.float64) for _ in range(n)],
                  heads=[torch.rand(m.num_heads, generator=g, dtype=torch.float64) for _ in range(n)],
                  hidden=torch.rand(m.hidden_size, generator=g, dtype=torch.float64),
                  depth=torch.rand(m.num_layers, generator=g, dtype=torch.float64))
