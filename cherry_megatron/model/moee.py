"""Mixture of Efficient Experts (MoEE): several compressed recurrent models fused into one routed model.

The design, after Branch-Train-MiX: each block's MLP becomes E experts (expert e = model e's MLP of that
block, with its per-position MLP LoRA), behind a learned top-k router per block; everything else
(embedding, attention and its per-position LoRA, norms, iteration embeddings, output layer) is the
average of the E models. Why the MLPs and not whole blocks: attention mixes tokens, so routing a token
to expert e's attention still needs e's keys and values at every earlier position, i.e. every expert's
attention on every token: no sparsity is left. An MLP acts on one token, so top-k of E computes k MLPs,
and the MLP holds two thirds of a SwiGLU block's weights.

Routing, capacity and expert parallelism are DeepSpeed's `deepspeed.moe.layer.MoE` (`moee.ep_size`
ranks hold E/ep_size experts each and exchange tokens all-to-all). With TP > 1 the experts are not
split: DeepSpeed gives each TP rank a share of the routed tokens instead (its default for experts
without tensor parallelism). Router losses: DeepSpeed's load-balancing loss (Switch/GShard) and the
router z-loss (ST-MoE), summed over routed layer calls, weighted by `moee.load_balance_weight` and
`moee.z_loss_weight`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from megatron.core import parallel_state
from torch import nn

from cherry_megatron import compat
from cherry_megatron.config import ModelConfig, MoEEConfig, RecurrentConfig
from cherry_megatron.distributed import MegatronMPU
from cherry_megatron.losses import aux_weights, z_loss
from cherry_megatron.model.tp_layout import lora_layouts, mark, tp_slice
from cherry_megatron.model.layers import SwiGLU, normal_init, parallel_config
from cherry_megatron.model.recurrent import RecurrentGPT, count_recurrent_parameters

EXPERTS = "mlp.deepspeed_moe.experts.deepspeed_experts"
MLP_PROJECTIONS = ("gate_up", "down")


class ExpertMLP(SwiGLU):
    """One expert: the dense model's SwiGLU (tensor-parallel like it) plus a LoRA delta per position of
    its block. DeepSpeed calls an expert with its routed tokens only, so `RoutedMLP.at_position` sets the
    position being run (`position`) around the call."""

    def __init__(self, cfg: ModelConfig, mp, positions: int, lora_rank: int):
        super().__init__(cfg, mp)
        self.args = (cfg, mp, positions, lora_rank)
        tp = mp.tensor_model_parallel_size
        for name, (fan_in, fan_out) in expert_lora_shapes(cfg).items() if lora_rank else ():
            layouts = dict(zip("AB", lora_layouts(self.get_parameter(f"{name}.weight"))))
            for part, shape in (("A", (positions, lora_rank, fan_in)), ("B", (positions, fan_out, lora_rank))):
                t, layout = torch.zeros(shape, dtype=mp.params_dtype), layouts[part]
                t = tp_slice(t, *layout, tp, 0) if layout else t
                self.register_parameter(f"{name}_lora_{part}", mark(nn.Parameter(t), layout))
        self.lora_rank = lora_rank
        self.position = None
        self.register_state_dict_post_hook(_empty_extra_state)

    def __deepcopy__(self, memo):
        # DeepSpeed's `Experts` deep-copies the expert for each local slot, but megatron's layers hold
        # process groups, which cannot be copied: build a fresh one (RoutedMLP sets its weights next).
        return ExpertMLP(*self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position is None and self.lora_rank:
            raise RuntimeError("ExpertMLP called outside RoutedMLP.at_position: which position's LoRA is unknown")
        lora = {name: (getattr(self, f"{name}_lora_A")[self.position], getattr(self, f"{name}_lora_B")[self.position])
                for name in MLP_PROJECTIONS} if self.lora_rank else None
        # DeepSpeed hands [ep, 1, capacity, hidden]; megatron's linear layers take 3-D input.
        return super().forward(x.reshape(1, -1, x.shape[-1]), lora).reshape(x.shape)


def _empty_extra_state(module, state_dict, prefix, local_metadata) -> None:
    # megatron's linear layers save `_extra_state` = None (they ignore it on load); DeepSpeed's expert
    # checkpointing clones every value it saves, so give it an empty tensor instead.
    for key in [k for k, v in state_dict.items() if k.startswith(prefix) and v is None]:
        state_dict[key] = torch.empty(0)


def expert_lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, f = cfg.hidden_size, cfg.ffn_size
    return {"gate_up": (h, 2 * f), "down": (f, h)}


class RoutedMLP(MoE):
    """DeepSpeed's MoE layer over `ExpertMLP`s, initialised the same at every ep_size and TP, plus the z-loss.

    With TP > 1 the experts are tensor-parallel like the dense MLP (`enable_expert_tensor_parallelism`):
    DeepSpeed drops the TP-duplicated tokens before its all-to-all and gathers them back before the
    experts, and expert-data-parallel groups stay within one TP rank."""

    def __init__(self, cfg: ModelConfig, ecfg: MoEEConfig, positions: int, lora_rank: int, dtype: torch.dtype):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cf = ecfg.capacity_factor
        # Construction draws from the RNG as many times as there are local experts (DeepSpeed copies the
        # expert per slot); fork it so the rest of the model is initialised the same at any ep_size and TP.
        with torch.random.fork_rng(devices=[]):
            super().__init__(cfg.hidden_size, ExpertMLP(cfg, parallel_config(tp, dtype), positions, lora_rank),
                             num_experts=ecfg.num_experts, ep_size=ecfg.ep_size, k=ecfg.top_k,
                             capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, min_capacity=0,
                             noisy_gate_policy="Jitter" if ecfg.router_jitter else None, drop_tokens=cf > 0,
                             use_rts=False, enable_expert_tensor_parallelism=tp > 1, top2_2nd_expert_sampling=False)
            if tp > 1:
                compat.pad_capacity_to_tp(self.deepspeed_moe.gate)
        # The expert groups exist from here on (not only after deepspeed.initialize), so this rank knows
        # which global experts it holds; weights are drawn for all E in order, so any ep_size gets the same.
        self.set_deepspeed_parallelism()
        compat.use_gloo_token_gather()
        first = self.ep_rank() * self.num_local_experts
        rank = parallel_state.get_tensor_model_parallel_rank()
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        with torch.no_grad():
            normal_init(std)(self.deepspeed_moe.gate.wg.weight)
            for g in range(ecfg.num_experts):
                full = {"gate_up.weight": torch.randn(2 * cfg.ffn_size, cfg.hidden_size) * std,
                        "down.weight": torch.randn(cfg.hidden_size, cfg.ffn_size) * out_std}
                for name, (fan_in, _) in expert_lora_shapes(cfg).items() if lora_rank else ():
                    full[f"{name}_lora_A"] = torch.randn(positions, lora_rank, fan_in) * std
                if first <= g < first + self.num_local_experts:
                    expert = self.experts()[g - first]
                    for name, t in full.items():
                        p = expert.get_parameter(name)
                        if getattr(p, "tensor_model_parallel", False):
                            t = tp_slice(t, p.partition_dim, p.partition_stride, tp, rank)
                        p.copy_(t)

    @contextlib.contextmanager
    def at_position(self, position: int):
        """The experts' LoRA row for the calls inside this block: DeepSpeed calls an expert with its routed
        tokens alone (deepspeed.moe.experts.Experts.forward takes no other argument), so the position
        cannot travel with the call. Unset outside it, so a call that forgot it fails loudly."""
        for expert in self.experts():
            expert.position = position
        try:
            yield
        finally:
            for expert in self.experts():
                expert.position = None

    def experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # Idempotent: the engine calls it again at deepspeed.initialize, and DeepSpeed asserts on a second call.
        if self.deepspeed_moe.ep_group is None and dist.is_initialized():
            if compat.deepspeed_mpu() is None and (self.enable_expert_tensor_parallelism or
                                                   parallel_state.get_pipeline_model_parallel_world_size() > 1):
                # The expert groups need it now: TP ones to exclude the TP ranks, and with PP to stay in one stage.
                compat.set_deepspeed_mpu(MegatronMPU())
            super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    def ep_rank(self) -> int:
        return compat.expert_parallel_rank(self.expert_group_name) if self.deepspeed_moe.ep_group else 0

    def route(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, load-balancing loss, z-loss) for the normed stream x at the block's `position`."""
        with self.at_position(position):
            out, l_aux, _ = self(x)
        return out, l_aux, z_loss(self.router_logits(x))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits [tokens, E] of x: DeepSpeed keeps its own to itself, so they are recomputed (tokens x
        hidden x E)."""
        return F.linear(x.reshape(-1, x.shape[-1]).float(), self.deepspeed_moe.gate.wg.weight.float())


class MoEEGPT(RecurrentGPT):
    """A recurrent model (or a dense one: each block run once, no per-position parameters) whose blocks'
    MLPs are `RoutedMLP`s; their router losses come back in `Output.aux` (layers.Block hands them to
    the pass's context)."""
    lora_projections = ("q", "kv", "o")
    mlp_type = RoutedMLP  # a subclass routes differently (model/smoe.py), with this constructor

    def __init__(self, cfg: ModelConfig, rcfg: RecurrentConfig, ecfg: MoEEConfig, params_dtype=torch.float32,
                 **options):
        rcfg = rcfg if rcfg.num_blocks else dense_as_recurrent(cfg)
        schedule = rcfg.resolved_schedule(cfg.num_layers)
        runs = [schedule.count(b) for b in range(rcfg.num_blocks)]
        mlp_type = self.mlp_type
        super().__init__(cfg, rcfg, params_dtype,
                         mlp_factory=lambda b: mlp_type(cfg, ecfg, runs[b], rcfg.lora_rank, params_dtype), **options)
        self.ecfg = ecfg
        self.aux_weights = aux_weights(ecfg)

    def localize_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict (experts 0..E-1 under global ids) -> this rank's experts under local ids."""
        out = {}
        for name, t in state.items():
            if f".{EXPERTS}." not in name:
                out[name] = t
                continue
            head, rest = name.split(f".{EXPERTS}.", 1)
            g, tail = rest.split(".", 1)
            try:
                mlp = self.get_submodule(head).mlp
            except AttributeError:  # not ours: load_into names it as unexpected
                out[name] = t
                continue
            local = int(g) - mlp.ep_rank() * mlp.num_local_experts
            if 0 <= local < mlp.num_local_experts:
                out[f"{head}.{EXPERTS}.{local}.{tail}"] = t
        return out


def dense_as_recurrent(cfg: ModelConfig) -> RecurrentConfig:
    return RecurrentConfig(num_blocks=cfg.num_layers, iteration_embedding=False, iteration_norms=False)


def count_moee_parameters(cfg: ModelConfig, rcfg: RecurrentConfig, ecfg: MoEEConfig) -> dict:
    """Analytic count: `total` stored, `active` used per token (top_k of E experts at every position)."""
    rcfg = rcfg if rcfg.num_blocks else dense_as_recurrent(cfg)
    base = count_recurrent_parameters(cfg, rcfg)
    h, f, r, e = cfg.hidden_size, cfg.ffn_size, rcfg.lora_rank, ecfg.num_experts
    mlp_lora = r * sum(i + o for i, o in expert_lora_shapes(cfg).values())
    per_expert = rcfg.num_blocks * 3 * h * f + cfg.num_layers * mlp_lora  # one expert across all blocks
    router = rcfg.num_blocks * e * h
    total = base["total"] - per_expert + e * per_expert + router
    return {**base, "experts": e * per_expert, "per_expert": per_expert, "router": router, "total": total,
            "active": total - (e - ecfg.top_k) * per_expert}
