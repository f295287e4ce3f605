"""Pipeline parallelism: the dense model as a DeepSpeed `PipelineModule` (embedding, one stage layer per
block, final norm + output layer), split over `parallel.pp` stages by block count.

Every rank first builds the whole (TP-sliced) model from the seed, as the unpipelined trainer does, and
keeps its stages' layers: the weights are those of the PP=1 model at any PP degree, which is what makes
PP runs comparable with PP=1 runs. The cost is the whole model in host memory once per rank at start-up.
What cannot run in a pipeline yet is refused by `config.validate`.
The topology is `distributed.topology`, the same rank order as megatron's parallel_state (checked at
start). Tied embeddings are a `TiedLayerSpec` on the first and last stage; a recurrent model's positions are
unrolled over the stages, each shared block a `TiedLayerSpec` (`RecurrentBlockStage`). Routed and MTP
models, early-exit losses and SGT do not run in a pipeline yet.
"""
from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn



class EmbedStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class BlockStage(nn.Module):
    def __init__(self, model, i: int):
        super().__init__()
        self.block = model.layers[i]
        self.rope = model.rope  # no weights: each stage computes cos/sin for its blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(x.shape[1], x.device, x.dtype)
        return self.block(x, cos, sin)


class RecurrentBlockStage(nn.Module):
    """Shared block b of a recurrent model with the per-position parameters (iteration embedding, norms,
    LoRA) of every position that runs it: one `TiedLayerSpec` per block, so each stage holding some of
    those positions holds a copy, and DeepSpeed sums the copies' gradients over the stages."""

    def __init__(self, model, b: int):
        super().__init__()
        self.block, self.rope, self.rcfg = model.layers[b], model.rope, model.rcfg
        positions = [i for i, blk in enumerate(model.schedule) if blk == b]
        for name, src in model.named_parameters(recurse=False):
            param = nn.Parameter(src.detach()[positions].clone())
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(src, attr):
                    setattr(param, attr, getattr(src, attr))
            self.register_parameter(name, param)

    def run(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The block's j-th position (`RecurrentGPT.position` on this block's rows)."""
        from cherry_megatron.model.recurrent import PROJECTIONS

        cos, sin = self.rope(x.shape[1], x.device, x.dtype)
        if self.rcfg.iteration_embedding:
            x = x + self.iter_embed[j]
        norms = (self.iter_norms[j, 0], self.iter_norms[j, 1]) if self.rcfg.iteration_norms else None
        lora = {p: (getattr(self, f"lora_{p}_A")[j], getattr(self, f"lora_{p}_B")[j]) for p in PROJECTIONS} \
            if self.rcfg.lora_rank else None
        return self.block(x, cos, sin, norms, lora)


def run_position(j: int, stage: RecurrentBlockStage, x: torch.Tensor) -> torch.Tensor:
    return stage.run(j, x)


class NormStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm = model.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def tied_head(head, stage: EmbedStage, x: torch.Tensor) -> torch.Tensor:
    """The output layer with the embedding's weight (`model.tie_embeddings`), on the last stage's copy of
    the tied embedding; DeepSpeed all-reduces the tied gradient over the stages that hold a copy."""
    return head(x, weight=stage.embed.weight)[0]


class HeadStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))[0]


def token_losses(logits: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    targets, loss_mask = labels
    return vocab_parallel_cross_entropy(logits.float(), targets), loss_mask.float()


def train_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """The micro-batch's masked mean, as the unpipelined trainer's objective (`sgt.masked_mean`)."""
    from cherry_megatron.sgt import masked_mean

    return masked_mean(*token_losses(logits, labels))


def eval_sums(logits: torch.Tensor, labels) -> torch.Tensor:
    """[sum of losses, tokens]: DeepSpeed averages these over micro-batches and DP ranks, and the ratio of
    the averages is the mean over every evaluated token however the windows fell."""
    losses, mask = token_losses(logits, labels)
    return torch.stack([(losses * mask).sum(), mask.sum()]).double()


def build_pipeline(cfg, topology, init_state: dict | None = None):
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    from cherry_megatron.checkpoint.consolidate import load_into
    from cherry_megatron.model import build_model

    model = build_model(cfg)
    if init_state is not None:
        load_into(model, init_state, f"model.init_from={cfg.model.init_from}")
    if cfg.recurrent.num_blocks:
        blocks = []
        for i, b in enumerate(model.schedule):
            tied = [n for n, _ in RecurrentBlockStage(model, b).named_parameters()]
            blocks.append(TiedLayerSpec(f"block{b}", RecurrentBlockStage, model, b, tied_weight_attr=tied,
                                        forward_fn=functools.partial(run_position, model.schedule[:i].count(b))))
    else:
        blocks = [BlockStage(model, i) for i in range(cfg.model.num_layers)]
    if cfg.model.tie_embeddings:
        layers = [TiedLayerSpec("embed", EmbedStage, model, tied_weight_attr="embed.weight"), *blocks, NormStage(model),
                  TiedLayerSpec("embed", EmbedStage, model, tied_weight_attr="embed.weight",
                                forward_fn=functools.partial(tied_head, model.head))]
    else:
        layers = [EmbedStage(model), *blocks, HeadStage(model)]
    every = cfg.train.activation_checkpointing
    return PipelineModule(layers, topology=topology, loss_fn=train_loss, partition_method="type:BlockStage",
                          activation_checkpoint_interval=every,
                          # torch's non-reentrant checkpoint, as the unpipelined models use (gpt.run_layer)
                          activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint,
                                                                       use_reentrant=False))
