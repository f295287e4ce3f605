"""Every loss the models and the trainer compute, and the one type a model's forward returns.

A forward pass returns an `Output`; the auxiliary terms (multi-token prediction, router losses) come back in
it by name with their weights, so no caller reads them off the module afterwards. Layers that produce a
term during the pass hand it to the pass's `LayerContext` (model/layers.py), which the model sums here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

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


def aux_weights(section) -> dict[str, float]:
    """The auxiliary terms a model of this routed section (`moee`, `smoe`) produces in training, in a fixed
    order, with their weights; a sparse model's MoA routers have terms of their own (logged apart)."""
    if not section.num_experts:
        out = {}
    else:
        out = {"load_balance_loss": section.load_balance_weight, "router_z_loss": section.z_loss_weight}
    if getattr(section, "attention_experts", False) and section.num_experts:
        out.update(moa_load_balance_loss=section.load_balance_weight, moa_z_loss=section.z_loss_weight)
    return {**out, "mtp_loss": section.mtp_weight} if getattr(section, "mtp_depth", 0) else out


def model_aux_weights(cfg) -> dict[str, float]:
    """`aux_weights` of the model a whole config tree describes."""
    return aux_weights(cfg.smoe if cfg.smoe.num_experts else cfg.moee)


def switch_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E * sum_i f_i P_i of router logits [tokens, E] (JetMoE's
    form, for any k): f_i the share of the tokens' top-k assignments that go to expert i (no gradient), P_i
    the mean router probability. 1 at a perfectly balanced router, E when every token goes to one expert."""
    e = logits.shape[-1]
    probs = logits.float().softmax(-1).reshape(-1, e)
    chosen = logits.detach().reshape(-1, e).topk(top_k, dim=-1).indices
    f = torch.zeros(e, device=logits.device).scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(),
                                                                                              device=logits.device))
    return e * (f / chosen.numel() * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def summed_aux(terms: dict[str, list], weights: dict[str, float]) -> dict:
    """{name: (weight, sum of the pass's terms)} from what the layers handed to their context."""
    return {name: (weights[name], torch.stack(values).sum()) for name, values in terms.items() if values}


# Distillation (cherry_megatron/distill.py): megatron-core has a vocab-parallel cross-entropy but no KL;
# ModelOpt's LogitsKLLoss is this computation, outside megatron-core.

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


def distill_terms(logits: torch.Tensor, h: torch.Tensor, targets: Targets, loss_mask: torch.Tensor) -> dict:
    """The distillation terms of a forward: {name: (weight, mean over the valid positions)}."""
    valid = loss_mask.float()
    n = valid.sum().clamp(min=1)
    out = {"kd_loss": (targets.kd_weight, (vocab_parallel_kl(logits, targets.logits, targets.temperature)
                                           * valid).sum() / n)}
    if targets.hidden is not None:
        out["hidden_loss"] = (targets.hidden_weight, (hidden_cosine_loss(h, targets.hidden) * valid).sum() / n)
    return out
