"""Every loss the models and the trainer compute, and the one type a model's forward returns.

A forward pass returns an `Output`; the auxiliary terms (multi-token prediction, router losses) come back in
it by name with their weights, so no caller reads them off the module afterwards. Layers that produce a
term during the pass hand it to the pass's `LayerContext` (model/layers.py), which the model sums here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from cherry_megatron import compat

compat.sync_free_cross_entropy()


class Output(NamedTuple):
    """What a model's forward returns. A NamedTuple, not a dataclass: DeepSpeed's ZeRO-3 hooks walk a
    module's outputs through tuples, dicts and namedtuples only, and a tensor it cannot see gets no
    backward hook (deepspeed/runtime/zero/utils.py `apply_to_tensors_only`)."""
    logits: Optional[torch.Tensor] = None  # vocab-parallel logits [b, s, v/tp], when no labels were given
    per_token: Optional[torch.Tensor] = None  # per-token cross-entropy [b, s]; 0 where SGT did not select
    mask: Optional[torch.Tensor] = None  # SGT: the supervised positions [b, s] (bool); None: not selected
    weight: Optional[torch.Tensor] = None  # SGT poisson/conditional: loss weights 1/pi [b, s]; None: plain mean
    aux: dict = {}  # name -> (weight, scalar with gradient): the objective's terms beyond the next-token loss
    stats: dict = {}  # name -> scalar without gradient, logged only (SGT's draw: selected share, clipped share)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of vocab-parallel logits. fp32 softmax whatever the compute dtype: bf16
    cross-entropy loses the small differences. Note megatron's kernel overwrites `logits` in place."""
    return vocab_parallel_cross_entropy(logits.float(), labels)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def sgt_objective(per_token: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, anchor: float,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1 - a) * L_selected + a * mean loss over all valid positions. L_selected: the mean over the selected
    positions (`top`), or with weights 1/pi the Horvitz-Thompson estimate sum(w * l) / n_valid, whose
    expectation over the draw is the full mean loss."""
    if weight is None:
        sel = masked_mean(per_token, mask)
    else:
        sel = (per_token * weight).sum() / valid.sum().clamp(min=1)
    if anchor == 0:
        return sel
    return (1 - anchor) * sel + anchor * masked_mean(per_token, valid)


def next_token_loss(out: Output, loss_mask: torch.Tensor, anchor: float = 0.0) -> torch.Tensor:
    """The logged training loss of a micro-batch: the masked mean, or SGT's objective when positions were selected."""
    if out.mask is None:
        return masked_mean(out.per_token, loss_mask)
    return sgt_objective(out.per_token, out.mask, loss_mask > 0, anchor, out.weight)


def with_aux(loss: torch.Tensor, aux: dict) -> torch.Tensor:
    """The objective: the next-token loss plus each auxiliary term times its weight."""
    for weight, term in aux.values():
        loss = loss + weight * term
    return loss


def aux_weights(moee) -> dict[str, float]:
    """The auxiliary terms a model of this `MoEEConfig` produces in training, in a fixed order, with their weights."""
    out = {"load_balance_loss": moee.load_balance_weight, "router_z_loss": moee.z_loss_weight} if moee.num_experts else {}
    return {**out, "mtp_loss": moee.mtp_weight} if moee.mtp_depth else out


def summed_aux(terms: dict[str, list], weights: dict[str, float]) -> dict:
    """{name: (weight, sum of the pass's terms)} from what the layers handed to their context."""
    return {name: (weights[name], torch.stack(values).sum()) for name, values in terms.items() if values}
