"""The dense decoder-only transformer (Llama-style: RMSNorm, RoPE, SwiGLU, GQA, SDPA)."""
from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from torch import nn

from cherry_megatron.config import ModelConfig
from cherry_megatron.losses import Output, distill_terms, masked_mean, summed_aux, token_losses, vocab_parallel_kl
from cherry_megatron.model.layers import (Block, LayerContext, LayerUnit, RotaryEmbedding, normal_init, output_logits,
                                          parallel_config)
from cherry_megatron.model.mtp import MTP


class GPT(nn.Module):
    """The model contract every model here keeps (dense, recurrent, routed, any with MTP): `embed(tokens)`,
    `units()` (the ordered layer units, model/layers.py `LayerUnit`), `final_norm`, `logits(h)` through
    `head`; `forward` returns a `losses.Output`. `hidden_states`, the trainer and the pipeline builder
    (model/pipeline.py) all consume those parts, so a subclass changes what a unit does, not the loop."""

    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype = torch.float32, *, recurrent=None,
                 mlp_factory=None, attn_factory=None, mtp_depth: int = 0, mtp_weight: float = 0.0, checkpoint_every: int = 0,
                 exits: dict | None = None, exit_distill_weight: float = 0.0):
        """`recurrent` (a RecurrentConfig) builds its num_blocks < cfg.num_layers blocks, unrolled to
        cfg.num_layers positions with per-position parameters (recurrent.py); init scaling follows the
        unrolled depth. `mlp_factory(block_index)` builds each block's MLP in place of the SwiGLU (moee.py),
        `attn_factory(mp)` its attention (a Mixture of Attention heads, smoe.py).
        `mtp_depth` adds multi-token prediction (mtp.py); `checkpoint_every` = n recomputes every n-th
        unit's activations in the backward pass (train.activation_checkpointing). `exits` {depth: weight} adds
        early-exit losses in training (train.exit_depths), `exit_distill_weight` the exits' KL to the final
        distribution."""
        super().__init__()
        self.cfg, self.rcfg = cfg, recurrent
        mp = parallel_config(parallel_state.get_tensor_model_parallel_world_size(), params_dtype)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                            config=mp)
        num_blocks = recurrent.num_blocks if recurrent is not None else cfg.num_layers
        self.layers = nn.ModuleList(Block(cfg, mp, mlp_factory(i) if mlp_factory else None,
                                          attn_factory(mp) if attn_factory else None) for i in range(num_blocks))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=params_dtype)
        self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, config=mp,
                                         init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                                         skip_weight_param_allocation=cfg.tie_embeddings)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.schedule = recurrent.resolved_schedule(cfg.num_layers) if recurrent is not None else list(range(num_blocks))
        self.build_position_parameters(params_dtype)
        # Built last, after every other weight: the seeded initialisation draws in this order.
        self.mtp = MTP(cfg, mtp_depth, params_dtype) if mtp_depth else None
        self.mtp_weight = mtp_weight
        self.checkpoint_every = checkpoint_every
        self.train_exits, self.exit_distill_weight = dict(exits or {}), exit_distill_weight
        self.aux_weights = {"mtp_loss": mtp_weight} if mtp_depth else {}

    def build_position_parameters(self, params_dtype: torch.dtype) -> None:
        """Per-position parameters of a recurrent model (recurrent.py); a dense model has none."""

    @property
    def exit_weights(self) -> dict[int, float]:
        """Exit depth -> weight of its loss in training: recurrent.exit_loss_weights, then train.exit_depths."""
        own = dict(zip(self.rcfg.exit_depths, self.rcfg.exit_loss_weights)) if self.rcfg is not None else {}
        return {**own, **self.train_exits}

    @property
    def final_norm(self) -> nn.Module:
        return self.norm  # stored as `norm.weight`: the name every checkpoint and export already uses

    def position(self, i: int):
        """What unit i adds to its block (recurrent.py); None for a dense model."""
        return None

    def units(self) -> list[LayerUnit]:
        return [LayerUnit(i, b, functools.partial(self._run_unit, i)) for i, b in enumerate(self.schedule)]

    def _run_unit(self, i: int, x: torch.Tensor, ctx: LayerContext, cache=None) -> torch.Tensor:
        return self.layers[self.schedule[i]](x, ctx, self.position(i), cache if cache is not None else ctx.cache(i))

    def context(self, x: torch.Tensor, offset: int = 0, caches=None) -> LayerContext:
        """The pass's RoPE for tokens at positions offset.. and, in generation, the units' KV caches."""
        return LayerContext(*self.rope(x.shape[1], x.device, x.dtype, offset), caches)

    def unroll(self, x: torch.Tensor, ctx: LayerContext, start: int = 0, end: int | None = None,
               taps: dict | None = None) -> torch.Tensor:
        """The residual stream after units start..end-1 (early-exit decoding continues from a depth);
        `taps[d]` collects the un-normed stream after each depth d it names."""
        units = self.units()
        for unit in units[start:len(units) if end is None else end]:
            x = self.run_layer(unit.index, unit.call, x, ctx)
            if taps is not None and unit.index + 1 in taps:
                taps[unit.index + 1] = x
        return x

    def hidden_states(self, tokens: torch.Tensor, depth: int = 0, taps: dict | None = None,
                      ctx: LayerContext | None = None) -> torch.Tensor:
        """Final-normed hidden states after `depth` units (0: all)."""
        x = self.embed(tokens)
        ctx = ctx if ctx is not None else self.context(x)
        return self.final_norm(self.unroll(x, ctx, 0, depth or None, taps))

    def run_layer(self, i: int, fn, *args) -> torch.Tensor:
        """fn(*args) for unit i; in training with `checkpoint_every` = n > 0, every n-th one keeps only its
        input and recomputes its activations in the backward pass. torch's checkpoint, not megatron's:
        megatron's needs its CUDA RNG tracker, and no layer here draws random numbers."""
        n = self.checkpoint_every
        if n and i % n == 0 and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return output_logits(self.head, h, self.embed.weight if self.cfg.tie_embeddings else None)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, select=None,
                loss_mask: torch.Tensor | None = None, depth: int = 0, distill=None) -> Output:
        """`Output.logits` without labels; `Output.per_token` (cross-entropy [b, s]) with labels.

        With `select` (an `sgt.Selection`) the head and the cross-entropy run only on the selected
        positions, whose hidden states are gathered first; unselected positions hold 0 (unless
        `select.full_loss`, then all are computed) and `Output.mask` says which. `depth` exits early.
        With `loss_mask` (the training objective) `Output.aux` holds the terms beyond the next-token
        loss (MTP, router losses) and, in training with `recurrent.exit_loss_weights`, each exit's
        per-token loss (same positions as the final one) is added with its weight. With `distill` (a
        `distill.Targets`, the teacher's outputs) and `loss_mask`, `aux` also holds the distillation terms.
        """
        training_objective = loss_mask is not None and labels is not None and not depth
        exits = self.exit_weights if labels is not None and self.training and not depth else {}
        x = self.embed(tokens)
        ctx = self.context(x)
        taps = {d: None for d in exits} if exits else None
        h = self.final_norm(self.unroll(x, ctx, 0, depth or None, taps))
        aux, logits = {}, None
        if distill is not None and training_objective:
            logits = self.logits(h)  # every position: the teacher's distribution is dense
            aux.update(distill_terms(logits, h, distill, loss_mask))
            # megatron's cross-entropy overwrites fp32 logits in place, which the KL's graph still reads
            logits = logits.clone() if logits.dtype == torch.float32 else logits
        per_token, picked = self.readout(h, labels, select, logits=logits)
        if labels is None:
            return Output(logits=per_token)
        final = self.logits(h).detach() if exits and self.exit_distill_weight and training_objective else None
        exit_kd = []
        for d, w in exits.items():
            he = self.final_norm(taps[d])
            per_token = per_token + float(w) * self.readout(he, labels, select, picked)[0]
            if final is not None:
                # The exit's own logits again (readout computed them for its selected positions only and the
                # cross-entropy consumed them): one more head matmul per exit, on every position.
                exit_kd.append(masked_mean(vocab_parallel_kl(self.logits(he), final), loss_mask))
        if exit_kd:
            aux["exit_kd_loss"] = (self.exit_distill_weight, sum(exit_kd))
        if training_objective:
            if self.mtp is not None:
                aux["mtp_loss"] = (self.mtp_weight, self.mtp(h, labels, loss_mask, self.embed, self.token_losses, ctx))
            aux.update(summed_aux(ctx.aux, self.aux_weights))
        if picked is None:
            return Output(per_token=per_token, aux=aux)
        return Output(per_token=per_token, mask=picked.mask, weight=picked.weight, aux=aux, stats=picked.stats)

    def readout(self, h: torch.Tensor, labels: torch.Tensor | None, select=None, picked=None, logits=None):
        """(logits, None) without labels, else (per-token losses, `sgt.Picked` or None) from final hidden
        states (see `forward`); `picked` reuses an earlier selection, `logits` the head's output on every
        position when it was computed already (it is consumed)."""
        if labels is None:
            return self.logits(h), None
        if select is None or select.full_loss:
            losses = token_losses(logits, labels) if logits is not None else self.token_losses(h, labels)
            return losses, (None if select is None else picked if picked is not None else select(losses.detach))
        if picked is None:
            picked = select(lambda: self.scoring_losses(h.detach(), labels))
        # Index ops with the count known on the host (`select.total`): boolean indexing would stop the host
        # for the size of its result on every micro-batch. A Poisson draw's count varies: its head is padded to
        # a fixed size; a pad (index n) reads the last row, and its loss lands in a slot past the end, dropped.
        n = labels.numel()
        idx = picked.mask.reshape(-1).nonzero_static(size=select.total, fill_value=n).squeeze(1)
        src = idx.clamp(max=n - 1)
        losses = self.token_losses(h.reshape(n, -1).index_select(0, src).unsqueeze(0),
                                   labels.reshape(-1).index_select(0, src).unsqueeze(0))[0]
        full = torch.zeros(n + 1, dtype=losses.dtype, device=losses.device).index_copy(0, idx, losses)
        return full[:n].view(labels.shape), picked

    def token_losses(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_losses(self.logits(h), labels)

    @torch.no_grad()
    def scoring_losses(self, h: torch.Tensor, labels: torch.Tensor, chunk_positions: int = 8192) -> torch.Tensor:
        """Per-token losses without gradient, a few thousand positions at a time, so scoring never holds
        the full [tokens x vocab] fp32 logits next to the ones the training loss keeps."""
        b, s, d = h.shape
        flat_h, flat_y = h.reshape(1, b * s, d), labels.reshape(1, b * s)
        out = [self.token_losses(flat_h[:, i:i + chunk_positions], flat_y[:, i:i + chunk_positions])
               for i in range(0, b * s, chunk_positions)]
        return torch.cat(out, dim=1).view(b, s)


def pad_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def count_parameters(cfg: ModelConfig) -> dict:
    """Analytic parameter count of the full (TP=1) model, by part."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_heads * hd * 2 + h * cfg.kv_heads * hd * 2
    mlp = 3 * h * cfg.ffn_size
    per_layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    total = cfg.num_layers * per_layer + embed + head + h
    return {"per_layer": per_layer, "layers": cfg.num_layers * per_layer, "embedding": embed,
            "head": head, "total": total}


def flops_per_token(cfg: ModelConfig, seq_length: int, experts_per_token: int = 1, mtp_depth: int = 0) -> float:
    """Training FLOPs per token, PaLM's 6N + 12·L·H·S (N: matmul weights a token passes through, input
    embedding excluded): a routed MLP counts `experts_per_token` times; each MTP module adds a block,
    its [h; emb] projection and the output layer."""
    n = count_parameters(cfg)
    h = cfg.hidden_size
    matmul = n["layers"] + (experts_per_token - 1) * cfg.num_layers * 3 * h * cfg.ffn_size + cfg.vocab_size * h
    matmul += mtp_depth * (n["per_layer"] + 2 * h * h + cfg.vocab_size * h)
    return 6.0 * matmul + 12.0 * (cfg.num_layers + mtp_depth) * h * seq_length


if __name__ == "__main__":  # `python -m cherry_megatron.model.gpt PRESET`: the counts of model/count.py
    import runpy  # by name: count.py builds models, which import this module (no import cycle)

    runpy.run_module("cherry_megatron.model.count", run_name="__main__")
