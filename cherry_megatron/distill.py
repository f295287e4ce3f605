"""Knowledge distillation from a frozen teacher (Minitron, arXiv 2407.14679 section 3; 2408.11796).

The teacher is built in the trainer's processes at the student's TP degree (each rank its slice of the vocabulary,
like the student), outside DeepSpeed (ZeRO never shards it), frozen, in the trainer's compute dtype (bf16 on
GPUs). Per step it runs once under no_grad; the student's forward receives its logits and final hidden states as
a `Targets` and adds
  kd_loss      forward KL(p_teacher || p_student) at temperature tau, per position, computed vocab-parallel:
               only [b, s] sums cross the TP group, never the logits (megatron-core has a vocab-parallel
               cross-entropy but no KL; ModelOpt's LogitsKLLoss is this computation, outside megatron-core);
  hidden_loss  1 - cos(final-normed student state, teacher's) per position (optional; equal widths only),
both averaged over the valid positions, as auxiliary terms with the weights `distill.kd_weight` and
`distill.hidden_weight`; the trainer weights the next-token loss by `distill.ce_weight`.

Under SGT the ground truth supervises the selected positions and the teacher every valid one: the teacher's
distribution costs no label and is dense, so there is nothing to save by distilling fewer positions, and the
student head then runs on every position (SGT's head saving does not apply while distilling).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from cherry_megatron.errors import CheckpointError


class Targets(NamedTuple):
    """What the student's forward distils towards (a NamedTuple: DeepSpeed's ZeRO-3 hooks walk namedtuples)."""
    logits: torch.Tensor  # the teacher's vocab-parallel logits [b, s, v/tp]
    hidden: Optional[torch.Tensor]  # its final-normed hidden states [b, s, h], when hidden_weight > 0
    temperature: float
    kd_weight: float
    hidden_weight: float


def _log_partition(z: torch.Tensor) -> torch.Tensor:
    """log sum over the whole vocabulary of exp(z) [b, s], z split over TP ranks: max-subtracted, the max
    all-reduced without gradient, the exp-sum with megatron's reduce (its backward: the identity)."""
    m = z.detach().amax(dim=-1)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return reduce_from_tensor_model_parallel_region((z - m.unsqueeze(-1)).exp().sum(-1)).log() + m


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t / tau) || softmax(s / tau)) per position [b, s], in fp32, from vocab-parallel logits.

    Its value is sum p_t (log p_t - log p_s) summed elementwise (exactly 0 for s == t; the form
    sum p_t log p_t - sum p_t s + log Z_s cancels to ~1e-5 in fp32), each rank's sum all-reduced. Its gradient
    with respect to the student's logits is (p_s - p_t) / tau: -p_t from the elementwise sum, p_s from the
    separate + log Z_s - log Z_s (value 0), whose megatron reduce back-propagates the identity: that is right
    for a term added after the all-reduce, with the same upstream gradient on every rank, not inside each
    rank's sum. No tau^2 factor (Hinton's, kept by some recipes, rescales the loss; Minitron distils at
    tau = 1, where it does not matter)."""
    s = student.float() / temperature
    log_z_s = _log_partition(s)
    with torch.no_grad():
        t = teacher.float() / temperature
        log_p_t = t - _log_partition(t).unsqueeze(-1)
        p_t = log_p_t.exp()
    local = (p_t * (log_p_t - (s - log_z_s.detach().unsqueeze(-1)))).sum(-1)
    return reduce_from_tensor_model_parallel_region(local) + (log_z_s - log_z_s.detach())


def hidden_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos per position [b, s] (Minitron's intermediate-state loss on the final states, ModelOpt's
    HiddenStateCosineLoss); the hidden states are whole on every TP rank."""
    return 1 - torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)


def terms(logits: torch.Tensor, h: torch.Tensor, targets: Targets, loss_mask: torch.Tensor) -> dict:
    """The distillation terms of a forward: {name: (weight, mean over the valid positions)}."""
    valid = loss_mask.float()
    n = valid.sum().clamp(min=1)
    out = {"kd_loss": (targets.kd_weight, (vocab_parallel_kl(logits, targets.logits, targets.temperature)
                                           * valid).sum() / n)}
    if targets.hidden is not None:
        out["hidden_loss"] = (targets.hidden_weight, (hidden_cosine_loss(h, targets.hidden) * valid).sum() / n)
    return out


class Teacher:
    """The frozen teacher of `distill.teacher`, split for this TP rank like the student."""

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype):
        from cherry_megatron.convert.load import load_model
        from cherry_megatron.model.gpt import pad_vocab

        d, m = cfg.distill, cfg.model
        self.model, tcfg = load_model(d.teacher)
        tm = tcfg.model
        if tm.vocab_size != m.vocab_size or pad_vocab(tm.vocab_size, tm.make_vocab_size_divisible_by, cfg.parallel.tp) \
                != pad_vocab(m.vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.tp):
            raise CheckpointError(f"distill.teacher {d.teacher} has vocabulary {tm.vocab_size}, the student "
                                  f"{m.vocab_size}: teacher and student must share the tokenizer")
        if d.hidden_weight and tm.hidden_size != m.hidden_size:
            raise CheckpointError(f"distill.hidden_weight needs the teacher's width: the teacher's hidden size is "
                                  f"{tm.hidden_size}, the student's {m.hidden_size} (a learned projection between "
                                  "widths is not built)")
        self.model = self.model.to(device=device, dtype=dtype).requires_grad_(False)
        self.cfg, self.tcfg = d, tcfg

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> Targets:
        h = self.model.hidden_states(tokens)
        return Targets(self.model.logits(h), h if self.cfg.hidden_weight else None, self.cfg.temperature,
                       self.cfg.kd_weight, self.cfg.hidden_weight)
