"""Knowledge distillation from a frozen teacher (Minitron, arXiv 2407.14679 section 3; 2408.11796).

The teacher is built in the trainer's processes at the student's TP degree (each rank its slice of the vocabulary,
like the student), outside DeepSpeed (ZeRO never shards it), frozen, in the trainer's compute dtype (bf16 on
GPUs). Per step it runs once under no_grad; the student's forward receives its logits and final hidden states as
a `losses.Targets` and adds (losses.distill_terms)
  kd_loss      forward KL(p_teacher || p_student) at temperature tau, per position, computed vocab-parallel:
               only [b, s] sums cross the TP group, never the logits (losses.vocab_parallel_kl);
  hidden_loss  1 - cos(final-normed student state, teacher's) per position (optional; equal widths only),
both averaged over the valid positions, as auxiliary terms with the weights `distill.kd_weight` and
`distill.hidden_weight`; the trainer weights the next-token loss by `distill.ce_weight`.

Under SGT the ground truth supervises the selected positions and the teacher every valid one: the teacher's
distribution costs no label and is dense, so there is nothing to save by distilling fewer positions, and the
student head then runs on every position (SGT's head saving does not apply while distilling).
"""
from __future__ import annotations

import torch

from cherry_megatron.errors import CheckpointError
from cherry_megatron.losses import Targets


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
