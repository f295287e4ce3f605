"""Pipeline parallelism: the dense model as a DeepSpeed `PipelineModule` (embedding, one stage layer per
block, final norm + output layer), split over `parallel.pp` stages by block count.

Every rank first builds the whole (TP-sliced) model from the seed, as the unpipelined trainer does, and
keeps its stages' layers: the weights are those of the PP=1 model at any PP degree, which is what makes
PP runs comparable with PP=1 runs. The cost is the whole model in host memory once per rank at start-up.
What cannot run in a pipeline yet is refused by `config.validate`.
The topology is `distributed.topology`, the same rank order as megatron's parallel_state (checked at
start). Tied embeddings are a `TiedLayerSpec` on the first and last stage; a recurrent model's positions are
unrolled over the stages, each shared block a `TiedLayerSpec` (`BlockStage`); a routed (MoEE)
model's blocks route their MLPs. Auxiliary losses (router losses on any stage, MTP on the last) enter the
gradient where they arise (`AuxLosses`), so the stages pass on hidden states only, plus the labels and loss
mask when an MTP head needs them. Early-exit losses and SGT do not run in a pipeline yet.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from torch import nn

from cherry_megatron import compat
from cherry_megatron.config import routing
from cherry_megatron.losses import masked_mean, model_aux_weights, token_losses
from cherry_megatron.model import build_model
from cherry_megatron.model.layers import LayerContext, output_logits, position_params


class AddAuxLoss(torch.autograd.Function):
    """x unchanged; its backward also puts gradient `scale` into the scalar `aux`. An auxiliary loss
    computed on an inner stage joins the gradient this way without travelling to the last stage's loss
    (megatron-core's MoEAuxLossAutoScaler does the same with a process-wide scale; this one is per model)."""

    @staticmethod
    def forward(ctx, x, aux, scale, losses, name):
        ctx.scale, ctx.losses, ctx.name = scale, losses, name
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad):
        aux, = ctx.saved_tensors
        # Logged here, not in forward: a checkpointed layer runs forward twice but backward once.
        ctx.losses.sums[ctx.name] = ctx.losses.sums.get(ctx.name, 0.0) + aux.detach().double()
        return grad, torch.full_like(aux, ctx.scale), None, None, None


class AuxLosses:
    """The weighted auxiliary terms of a pipelined model. DeepSpeed scales the last stage's loss by
    1 / micro-batches before its backward; each term gets weight / micro-batches, so the gradient is the
    unpipelined objective's. `sums` adds up each term's value over a step on this stage (for logging)."""

    def __init__(self, weights: dict[str, float], micro_batches: int):
        self.weights, self.scale, self.sums = weights, 1.0 / micro_batches, {}

    def attach(self, x: torch.Tensor, name: str, term: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x
        return AddAuxLoss.apply(x, term, self.weights[name] * self.scale, self, name)

    def pop(self) -> dict:
        out, self.sums = self.sums, {}
        return out


class StageContext(LayerContext):
    """A stage's layer context: the auxiliary terms its routed layers produce join the gradient right
    there (`AuxLosses.attach`), since they cannot travel to the last stage's loss."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, aux: AuxLosses | None):
        super().__init__(cos, sin)
        self.losses = aux

    def add_aux(self, out: torch.Tensor, name: str, term: torch.Tensor) -> torch.Tensor:
        return self.losses.attach(out, name, term)


def carried(fn, x):
    """fn on the hidden states; the labels and loss mask an MTP head needs (if any) ride along unchanged."""
    return (fn(x[0]), *x[1:]) if isinstance(x, tuple) else fn(x)


class EmbedStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.embed

    def forward(self, tokens):
        return carried(self.embed, tokens)


class BlockStage(nn.Module):
    """Block b of the model with the per-position parameters (iteration embedding, norms, LoRA) of every
    unit that runs it, as rows of the model's stacks (`layers.position_params` reads them here as in the
    model). A block that several units run is one `TiedLayerSpec`, so each stage holding some of those
    units holds a copy, and DeepSpeed sums the copies' gradients over the stages. A dense model's block
    runs once and has no per-position parameters."""

    def __init__(self, model, b: int, aux: AuxLosses | None = None):
        super().__init__()
        self.block, self.rope, self.rcfg = model.layers[b], model.rope, model.rcfg
        self.projections, self.aux = getattr(model, "lora_projections", ()), aux
        rows = [u.index for u in model.units() if u.block == b]
        for name, src in model.named_parameters(recurse=False):  # the per-position stacks [positions, ...]
            param = nn.Parameter(src.detach()[rows].clone())
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(src, attr):
                    setattr(param, attr, getattr(src, attr))
            self.register_parameter(name, param)

    def forward(self, x):
        return run_unit(0, self, x)

    def run(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The block's j-th unit (what the model's own unit computes, on this block's rows)."""
        ctx = StageContext(*self.rope(x.shape[1], x.device, x.dtype), self.aux)
        pos = position_params(self, j, self.rcfg, self.projections, j) if self.rcfg is not None else None
        return self.block(x, ctx, pos)


def run_unit(j: int, stage: BlockStage, x):
    return carried(functools.partial(stage.run, j), x)


class NormStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm = model.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class MTPHeadStage(nn.Module):
    """The last stage of a model with multi-token prediction: final norm, output layer, the MTP modules
    and a copy of the embedding (tied to the first stage's: MTP embeds the tokens ahead with it), reading
    the labels and loss mask carried from the first stage."""

    def __init__(self, model, aux: AuxLosses):
        super().__init__()
        self.embed, self.norm, self.head, self.mtp, self.rope = model.embed, model.norm, model.head, model.mtp, model.rope
        self.tie, self.aux = model.cfg.tie_embeddings, aux

    def forward(self, x: tuple) -> torch.Tensor:
        h, labels, loss_mask = x
        h = self.norm(h)
        if torch.is_grad_enabled():  # training; evaluation never computes MTP (as the unpipelined models)
            ctx = LayerContext(*self.rope(labels.shape[1], h.device, h.dtype))
            term = self.mtp(h, labels, loss_mask, self.embed, lambda hh, y: token_losses(self.logits(hh), y), ctx)
            # On h, not on the logits: the vocab-parallel cross-entropy overwrites its logits in place.
            h = self.aux.attach(h, "mtp_loss", term)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return output_logits(self.head, h, self.embed.weight if self.tie else None)


def tied_head(head, stage: EmbedStage, x: torch.Tensor) -> torch.Tensor:
    """The output layer with the embedding's weight (`model.tie_embeddings`), on the last stage's copy of
    the tied embedding; DeepSpeed all-reduces the tied gradient over the stages that hold a copy."""
    return output_logits(head, x, stage.embed.weight)


class HeadStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_logits(self.head, self.norm(x))


def train_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """The micro-batch's masked mean, as the unpipelined trainer's objective."""
    targets, loss_mask = labels
    return masked_mean(token_losses(logits, targets), loss_mask.float())


def eval_sums(logits: torch.Tensor, labels) -> torch.Tensor:
    """[sum of losses, tokens]: DeepSpeed averages these over micro-batches and DP ranks, and the ratio of
    the averages is the mean over every evaluated token however the windows fell."""
    targets, loss_mask = labels
    losses, mask = token_losses(logits, targets), loss_mask.float()
    return torch.stack([(losses * mask).sum(), mask.sum()]).double()


def pipe_batch(b: dict, cfg) -> tuple:
    """(first stage's input, last stage's labels) for DeepSpeed's data iterator. With an MTP head the labels
    and loss mask also travel through the stages, the mask as integers: DeepSpeed expects a gradient back
    for every floating-point tensor it passes on."""
    labels = (b["labels"], b["loss_mask"])
    return ((b["tokens"], b["labels"], (b["loss_mask"] > 0).long()) if cfg.moee.mtp_depth else b["tokens"]), labels


PARTITIONS = {"layers": "type:BlockStage", "parameters": "parameters"}


@contextlib.contextmanager
def local_blocks_only(cfg, topology, rank: int):
    """Building a dense model for a pipeline stage: every decoder block is still constructed, so its weights
    draw from the RNG as at any other layout, but a block outside this rank's stage is emptied onto the meta
    device as soon as it is registered; the rank never holds the other stages' weights. The stage bounds are
    DeepSpeed's own partition (`cherry-plan`'s `stage_bounds`, tested against the built pipeline). Recurrent
    and routed models (blocks shared or tied across stages) build whole."""
    if cfg.recurrent.num_blocks or routing(cfg):
        yield
        return
    from cherry_megatron.cli.plan import stage_bounds
    from cherry_megatron.model.layers import Block

    p, stage = cfg.parallel, topology.get_coord(rank).pipe
    lo, hi = stage_bounds(cfg.model, p.tp, p.pp, p.pipeline_partition)[stage:][:2]
    keep = {i - 1 for i in range(lo, hi)}  # layer i + 1 of [embed, blocks..., head] is block i
    # The embedding also serves the last stage when tied to the head or read by MTP.
    drop = {"head"} if stage < p.pp - 1 else set()
    if stage > 0 and not cfg.model.tie_embeddings and not cfg.moee.mtp_depth:
        drop.add("embed")
    seen = []

    def hook(module, name, sub):
        if isinstance(module, nn.ModuleList) and isinstance(sub, Block):
            seen.append(name)
            if len(seen) - 1 < cfg.model.num_layers and len(seen) - 1 not in keep:
                sub.to("meta")
        elif name in drop and not isinstance(module, nn.ModuleList) and hasattr(module, "units"):
            sub.to("meta")  # the model's own embedding or head, on a stage without it

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_pipeline(cfg, topology, model=None):
    """`model` (default: `build_model(cfg)`), whole on every rank, cut into this rank's stage layers."""
    model = model if model is not None else build_model(cfg)
    t, dp = cfg.train, topology.get_dim("data")
    aux = AuxLosses(model_aux_weights(cfg), t.global_batch_size // (t.micro_batch_size * dp))
    units = model.units()
    runs = [sum(1 for u in units if u.block == unit.block) for unit in units]
    blocks = []
    for unit, n in zip(units, runs):
        if n == 1:
            blocks.append(BlockStage(model, unit.block, aux))
            continue
        row = sum(1 for u in units[:unit.index] if u.block == unit.block)
        tied = [name for name, _ in BlockStage(model, unit.block).named_parameters()]
        blocks.append(TiedLayerSpec(f"block{unit.block}", BlockStage, model, unit.block, aux, tied_weight_attr=tied,
                                    forward_fn=functools.partial(run_unit, row)))
    embed = lambda **kw: TiedLayerSpec("embed", EmbedStage, model, tied_weight_attr="embed.weight", **kw)  # noqa: E731
    if cfg.moee.mtp_depth:
        layers = [embed(), *blocks, TiedLayerSpec("embed", MTPHeadStage, model, aux, tied_weight_attr="embed.weight")]
    elif cfg.model.tie_embeddings:
        layers = [embed(), *blocks, NormStage(model), embed(forward_fn=functools.partial(tied_head, model.head))]
    else:
        layers = [EmbedStage(model), *blocks, HeadStage(model)]
    every = cfg.train.activation_checkpointing
    pipe = PipelineModule(layers, topology=topology, loss_fn=train_loss,
                          partition_method=PARTITIONS[cfg.parallel.pipeline_partition],
                          activation_checkpoint_interval=every,
                          # torch's non-reentrant checkpoint, as the unpipelined models use (gpt.run_layer)
                          activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint,
                                                                       use_reentrant=False))
    head = pipe.tied_modules["embed"] if "embed" in pipe.tied_modules else None
    if isinstance(head, MTPHeadStage):  # of this tied module only the embedding is tied; the rest lives here alone
        compat.count_in_grad_norm(p for name, p in head.named_parameters() if name != "embed.weight")
    pipe.aux_losses = aux
    return pipe
