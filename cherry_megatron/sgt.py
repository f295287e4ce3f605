"""Selective ground-truth token training (SGT): supervise a fraction of the output positions.

A policy scores every valid position of a micro-batch; `sgt.sampling` turns the scores into a selection
(per sequence or per micro-batch, `sgt.scope`):
  top          the round(ratio * n) highest-scored positions, loss averaged over them: biased, a position the
               policy never picks is never supervised;
  poisson      each position drawn with probability pi ~ score^(1/T), ratio * n expected, its loss weighted
               1/pi: an unbiased estimate of the full-sequence loss (sgt_sampling.py);
  conditional  the same pi with exactly round(ratio * n) positions (conditional Poisson sampling).
The model gathers the hidden states of the selected positions before its output layer, so the LM head and the
vocab-parallel cross-entropy run on those positions only (`GPT.forward(..., select=...)`).

Policies (score = how much a position deserves supervision; all see the *target* token of a position):
  random     uniform scores from a generator seeded by (train.seed, sample index): reproducible, and the
             same on every tensor-parallel rank because TP ranks read the same samples.
  frequency  information content -log p(target) of the unigram distribution of the training data.
  loss       the current model's per-token loss, computed without gradient and in chunks.
  excess     current loss minus a frozen reference model's loss (Rho-1).
  payload    `frequency`, restricted first to content-bearing pieces (`payload.py` gives the rule).
Under poisson/conditional a score must be positive: random scores 1 (uniform pi), excess scores
exp(excess) = p_ref / p_model, loss is floored at 1e-6, and payload scores a function piece as the
vocabulary's most frequent piece (below every content piece, yet never zero: unbiased needs pi > 0).

The gradient-coupling probe (`gradient_cosine`) measures gamma: the cosine between the parameter
gradient of the loss on supervised positions and that of the loss on unsupervised positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.utils import get_blend_from_list

from cherry_megatron.config import SGTConfig
from cherry_megatron.convert.load import load_model
from cherry_megatron.engine import compute_dtype
from cherry_megatron.data.indexed import token_stream
from cherry_megatron import distributed
from cherry_megatron.errors import CheckpointError, DataError
from cherry_megatron.payload import content_pieces
from cherry_megatron.sgt_sampling import conditional, inclusion_probabilities, poisson, poisson_bucket


def selected_count(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up (not Python's banker's rounding)."""
    return int(math.floor(ratio * n + 0.5))


def group_sizes(valid: torch.Tensor, scope: str) -> list[int]:
    """Valid positions per sequence (scope=sequence) or in the whole micro-batch (scope=batch). The trainer
    counts on the host copy of the loss mask, so the device never has to report it."""
    n = valid.sum(1) if scope == "sequence" else valid.sum().reshape(1)
    return [int(v) for v in n.tolist()]


def selected_counts(valid: torch.Tensor, ratio: float, scope: str) -> list[int]:
    """round(ratio * n_valid) per group (`group_sizes`)."""
    return [selected_count(ratio, n) for n in group_sizes(valid, scope)]


def select_top(scores: torch.Tensor, valid: torch.Tensor, ratio: float, scope: str,
               counts: Optional[list[int]] = None) -> torch.Tensor:
    """Bool mask [b, s] of exactly round(ratio * n_valid) positions per sequence (or per batch) with the
    highest scores, ties to the earlier position; invalid positions are never chosen.

    By rank, not `topk` per row: k differs between rows, and a per-row k read from the device would stop the
    host once per sequence. `counts` (`selected_counts`) comes from the host; without it, one read here."""
    counts = selected_counts(valid, ratio, scope) if counts is None else counts
    flat = scores.float().masked_fill(~valid, float("-inf")).reshape(len(counts), -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    k = distributed.to_device(torch.tensor(counts, dtype=torch.int64), flat.device)
    chosen = torch.arange(flat.shape[1], device=flat.device).expand_as(flat) < k[:, None]
    return torch.zeros_like(chosen).scatter_(1, order, chosen).view_as(valid)


class Policy:
    """Scores positions; higher is more deserving of supervision."""
    needs_losses = False  # scores need the current model's per-token losses
    needs_reference = False

    def scores(self, labels: torch.Tensor, key: int, losses: Optional[torch.Tensor] = None,
               ref_losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def log_scores(self, labels: torch.Tensor, key: int, losses: Optional[torch.Tensor] = None,
                   ref_losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log of a positive score, for poisson/conditional sampling (pi ~ score^(1/T))."""
        return self.scores(labels, key, losses, ref_losses).float().clamp(min=1e-6).log()


class RandomPolicy(Policy):
    def __init__(self, seed: int):
        self.seed = seed

    def scores(self, labels, key, losses=None, ref_losses=None):
        # Drawn on the host (the same numbers on every device type) and copied without stopping the host.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        return distributed.to_device(torch.rand(labels.shape, generator=g), labels.device)

    def log_scores(self, labels, key, losses=None, ref_losses=None):
        return torch.zeros(labels.shape, device=labels.device)  # uniform: pi = ratio everywhere


class FrequencyPolicy(Policy):
    def __init__(self, counts: np.ndarray):
        self.info = information(counts)
        self._on: dict = {}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """A per-vocabulary table on `device`, copied once: a copy per micro-batch from pageable host memory
        would make the host wait for the device's queue."""
        if (name, device) not in self._on:
            self._on[(name, device)] = getattr(self, name).to(device)
        return self._on[(name, device)]

    def scores(self, labels, key, losses=None, ref_losses=None):
        return self.on("info", labels.device)[labels]


class LossPolicy(Policy):
    needs_losses = True

    def scores(self, labels, key, losses=None, ref_losses=None):
        return losses


class ExcessPolicy(Policy):
    needs_losses = True
    needs_reference = True

    def scores(self, labels, key, losses=None, ref_losses=None):
        return losses - ref_losses

    def log_scores(self, labels, key, losses=None, ref_losses=None):
        return losses - ref_losses  # score exp(excess) = p_ref / p_model: positive, ordered as excess


class PayloadPolicy(FrequencyPolicy):
    def __init__(self, counts: np.ndarray, content: np.ndarray):
        super().__init__(counts)
        function = torch.from_numpy(~content[: len(self.info)])
        # Sampling: a function piece weighs as the most frequent piece does, the least any piece can.
        self.log_info = torch.where(function, self.info.min(), self.info).log()
        # Top: function pieces rank below every content piece, so they are used only when content runs out.
        self.info = self.info - 1e4 * function.float()

    def log_scores(self, labels, key, losses=None, ref_losses=None):
        return self.on("log_info", labels.device)[labels]


def information(counts: np.ndarray) -> torch.Tensor:
    """-log p of each vocabulary id under add-one-smoothed unigram counts."""
    c = torch.from_numpy(np.asarray(counts, dtype=np.float64)) + 1.0
    return (-(c / c.sum()).log()).float()


def unigram_counts(paths: list, vocab_size: int, counts_file: str = "") -> np.ndarray:
    """Token counts of the training data: from `counts_file` (tools/token_counts.py) or counted here."""
    if counts_file:
        try:
            counts = np.load(counts_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read unigram counts {counts_file}: {e}") from None
    else:

        counts = np.zeros(vocab_size, dtype=np.int64)
        for prefix in get_blend_from_list([str(p) for p in paths])[0]:
            stream = token_stream(prefix)
            for i in range(0, len(stream), 1 << 24):  # chunks: a memmap of billions of tokens stays on disk
                chunk = np.bincount(stream[i:i + (1 << 24)], minlength=vocab_size)
                if len(chunk) > vocab_size:
                    raise DataError(f"{prefix} holds token id {len(chunk) - 1}, beyond the vocabulary {vocab_size}")
                counts += chunk
    if counts.ndim != 1 or len(counts) > vocab_size:
        raise DataError(f"unigram counts have shape {counts.shape}, expected at most ({vocab_size},)")
    return np.pad(counts, (0, vocab_size - len(counts)))


def build_policy(cfg: SGTConfig, seed: int, vocab_size: int, data_paths: list, tokenizer_model: str = "") -> Policy:
    if cfg.policy == "random":
        return RandomPolicy(seed)
    if cfg.policy == "loss":
        return LossPolicy()
    if cfg.policy == "excess":
        return ExcessPolicy()
    counts = unigram_counts(data_paths, vocab_size, cfg.counts)
    if cfg.policy == "frequency":
        return FrequencyPolicy(counts)

    return PayloadPolicy(counts, content_pieces(tokenizer_model, vocab_size))


class Picked(NamedTuple):
    """A selection: the supervised positions and, when drawn (poisson/conditional), their loss weights."""
    mask: torch.Tensor  # bool [b, s]
    weight: Optional[torch.Tensor] = None  # float [b, s]: 1/pi (clipped) where selected, else 0; None: `top`
    stats: dict = {}  # name -> device scalar, logged as a mean over micro-batches


@dataclass
class Selection:
    """One micro-batch's selection, handed to the model's forward (`select=`), which calls it with a
    function that returns the per-token losses [b, s] (no gradient) when the policy needs them."""
    policy: Policy
    ratio: float
    scope: str
    labels: torch.Tensor
    valid: torch.Tensor
    key: int
    ref_losses: Optional[torch.Tensor] = None
    full_loss: bool = False  # anchor_weight > 0: the model returns every position's loss with gradient
    sizes: Optional[list[int]] = None  # valid positions per group, from the host's loss mask; None: counted here
    sampling: str = "top"
    temperature: float = 1.0
    max_weight: float = 0.0
    seed: int = 0  # with `key`, seeds the draw: the same positions on every rank that reads this sample
    counts: list[int] = field(init=False)  # positions selected per group (Poisson: their expected count rounded)

    def __post_init__(self):
        if self.sizes is None:
            self.sizes = group_sizes(self.valid, self.scope)
        self.counts = [selected_count(self.ratio, n) for n in self.sizes]
        if self.sampling == "conditional":  # a short row with round(ratio n) = 0 would never be estimated
            self.counts = [max(c, 1) if n else 0 for c, n in zip(self.counts, self.sizes)]

    @property
    def padded(self) -> bool:
        """The gathered head holds `total` rows, some of them padding (a Poisson draw's count varies)."""
        return self.sampling == "poisson"

    @property
    def total(self) -> int:
        """The gathered head's size, known without asking the device: the selected count, or Poisson's bucket."""
        if self.padded:
            return poisson_bucket(self.ratio * sum(self.sizes), sum(self.sizes))
        return sum(self.counts)

    def __call__(self, losses_fn: Callable[[], torch.Tensor]) -> Picked:
        losses = losses_fn() if self.policy.needs_losses else None
        if self.sampling == "top":
            scores = self.policy.scores(self.labels, self.key, losses, self.ref_losses)
            return Picked(select_top(scores, self.valid, self.ratio, self.scope, self.counts))
        return self.draw(self.policy.log_scores(self.labels, self.key, losses, self.ref_losses))

    def draw(self, log_scores: torch.Tensor) -> Picked:
        shape, dev = self.valid.shape, self.valid.device
        groups = shape[0] if self.scope == "sequence" else 1
        valid = self.valid.reshape(groups, -1)
        # Uniforms from the host (the same numbers on every device type and rank); SeedSequence mixes
        # (seed, key, 1) so no other (seed, key) pair, nor random's scores, shares the stream.
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.key, 1]).generate_state(1)[0]))
        u = distributed.to_device(torch.rand(valid.shape, generator=g, dtype=torch.float64), dev)
        dropped = torch.zeros((), device=dev)
        if self.sampling == "poisson":
            pi = inclusion_probabilities(log_scores.reshape(groups, -1), valid, valid.sum(1) * self.ratio,
                                         self.temperature)
            mask = poisson(pi, u)
            keep = (mask.reshape(-1).cumsum(0) <= self.total).view_as(mask)  # past the bucket: dropped, counted
            dropped = (mask & ~keep).sum().float()
            mask = mask & keep
        else:
            m = distributed.to_device(torch.tensor(self.counts, dtype=torch.int64), dev)
            pi = inclusion_probabilities(log_scores.reshape(groups, -1), valid, m, self.temperature)
            mask, pi = conditional(pi, m, u, max(self.counts))
        weight = torch.where(mask, 1.0 / pi.clamp(min=1e-300), torch.zeros_like(pi))
        chosen = mask.sum().clamp(min=1).float()
        clipped = torch.zeros((), device=dev)
        if self.max_weight:
            clipped = (weight > self.max_weight).sum().float() / chosen
            weight = weight.clamp(max=self.max_weight)
        stats = {"sgt_selected_share": mask.sum().float() / valid.sum().clamp(min=1).float(),
                 "sgt_clipped_share": clipped, "sgt_dropped": dropped}
        return Picked(mask.view(shape), weight.view(shape).float(), stats)


def gradient_cosine(loss_a: Callable[[], torch.Tensor], loss_b: Callable[[], torch.Tensor],
                    params: list[torch.nn.Parameter], tp_group=None, dp_group=None) -> float:
    """cos(grad loss_a, grad loss_b) over all parameters of the whole (unsplit) model.

    Each loss is a function that runs its own forward pass: megatron's vocab-parallel cross-entropy
    overwrites its saved softmax in backward, so one graph cannot be differentiated twice.
    Gradients are summed over data-parallel ranks first (the gradient of the global batch, up to a
    scale the cosine ignores). Under tensor parallelism a split weight's products are summed over TP
    ranks; a replicated weight (norms) has the same gradient on every TP rank and is counted once.
    """
    ga = torch.autograd.grad(loss_a(), params, allow_unused=True)
    gb = torch.autograd.grad(loss_b(), params, allow_unused=True)
    split = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    repl = torch.zeros_like(split)
    for p, a, b in zip(params, ga, gb):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            ab = torch.stack([a.double(), b.double()])
            dist.all_reduce(ab, group=dp_group)
            a, b = ab[0], ab[1]
        a, b = a.double(), b.double()
        acc = split if getattr(p, "tensor_model_parallel", False) else repl
        acc += torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()])
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(split, group=tp_group)
    dot, na, nb = (split + repl).tolist()
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


class SGT:
    """The trainer's SGT state: the policy, the frozen reference model (policy=excess), the probe."""

    def __init__(self, cfg, layout, device: torch.device):
        self.cfg, self.device = cfg.sgt, device
        self.seed = cfg.train.seed + 1_000_033 * cfg.sgt.seed
        self.policy = build_policy(cfg.sgt, self.seed, cfg.model.vocab_size, cfg.data.paths,
                                   cfg.data.tokenizer_model)
        self.reference = load_reference(cfg.sgt.reference, cfg.model.vocab_size, layout, device,
                                        compute_dtype(cfg.train.precision, device)) \
            if self.policy.needs_reference else None

    def selection(self, batch: dict, key: int, host_loss_mask: Optional[torch.Tensor] = None) -> Selection:
        """`host_loss_mask`: the batch's loss mask before it went to the device (counts without a sync)."""
        sizes = None if host_loss_mask is None else group_sizes(host_loss_mask > 0, self.cfg.scope)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference(batch["tokens"], batch["labels"]).per_token.float()
        g = self.cfg
        return Selection(self.policy, g.ratio, g.scope, batch["labels"], batch["loss_mask"] > 0, key, ref,
                         full_loss=g.anchor_weight > 0, sizes=sizes, sampling=g.sampling,
                         temperature=g.temperature, max_weight=g.max_weight, seed=self.seed)

    @torch.no_grad()
    def probe_masks(self, module: torch.nn.Module, batch: dict, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected, unselected-but-valid) float masks of a batch, as the training step would select."""
        sel = self.selection(batch, key)
        per_token = module(batch["tokens"], batch["labels"]).per_token.float()
        mask = sel(lambda: per_token).mask
        return mask.float(), (sel.valid & ~mask).float()

    def head_flops_saved(self, model_cfg) -> float:
        """Training FLOPs per token not spent, against full supervision: the head's forward and backward
        on unselected positions, less a forward pass on all positions when the policy scores by loss. Under
        `poisson` the expected count: the bucket's padding rows are computed but are not useful work."""
        head = 2.0 * model_cfg.vocab_size * model_cfg.hidden_size
        saved = 3 * head * (1 - self.cfg.ratio) if self.cfg.anchor_weight == 0 else 0.0
        return saved - (head if self.policy.needs_losses and self.cfg.anchor_weight == 0 else 0.0)


def load_reference(path: str, vocab_size: int, layout, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The frozen reference model of `excess`, split for this TP rank like the trained model, in the trained
    model's precision (an fp32 reference beside a bf16 model would score positions by precision, not content)."""

    model, ref_cfg = load_model(path)
    if ref_cfg.model.vocab_size != vocab_size:
        raise CheckpointError(f"sgt.reference {path} has vocabulary {ref_cfg.model.vocab_size}, the model {vocab_size}: "
                              "the reference must share the tokenizer")
    return model.to(device=device, dtype=dtype).requires_grad_(False)
