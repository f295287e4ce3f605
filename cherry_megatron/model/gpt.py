"""The dense decoder-only transformer (Llama-style: RMSNorm, RoPE, SwiGLU, GQA, SDPA)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn

from cherry_megatron.config import ModelConfig
from cherry_megatron.model.layers import Block, RotaryEmbedding, normal_init


def parallel_config(tp: int, params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    # CPU initialisation on every device keeps the weights independent of the TP degree (see layers.py).
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               params_dtype=params_dtype, perform_initialization=True)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype = torch.float32, num_blocks: int = 0,
                 mlp_factory=None):
        """`num_blocks` < cfg.num_layers builds fewer blocks for a recurrent model (recurrent.py) that
        unrolls them to cfg.num_layers positions; init scaling follows the unrolled depth.
        `mlp_factory(block_index)` builds each block's MLP in place of the SwiGLU (moee.py)."""
        super().__init__()
        self.cfg = cfg
        mp = parallel_config(parallel_state.get_tensor_model_parallel_world_size(), params_dtype)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                            config=mp)
        self.layers = nn.ModuleList(Block(cfg, mp, mlp_factory(i) if mlp_factory else None)
                                    for i in range(num_blocks or cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=params_dtype)
        self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, config=mp,
                                         init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                                         skip_weight_param_allocation=cfg.tie_embeddings)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.checkpoint_every = 0  # activation checkpointing: every n-th layer (train.activation_checkpointing)
        self.mtp = None  # multi-token prediction (mtp.py), attached by model.build_model
        self.mtp_weight = 0.0
        self.aux_terms: dict = {}

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.rope(tokens.shape[1], x.device, x.dtype)
        for i, layer in enumerate(self.layers):
            x = self.run_layer(i, layer, x, cos, sin)
        return self.norm(x)

    def run_layer(self, i: int, fn, *args) -> torch.Tensor:
        """fn(*args) for layer (or position) i; in training with `checkpoint_every` = n > 0, every n-th one
        keeps only its input and recomputes its activations in the backward pass. torch's checkpoint, not
        megatron's: megatron's needs its CUDA RNG tracker, and no layer here draws random numbers."""
        n = self.checkpoint_every
        if n and i % n == 0 and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits: each TP rank holds its slice of the vocabulary."""
        out, _ = self.head(h, weight=self.embed.weight if self.cfg.tie_embeddings else None)
        return out

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, select=None,
                loss_mask: torch.Tensor | None = None):
        """Vocab-parallel logits without labels; per-token cross-entropy [b, s] with labels.

        With `select` (an `sgt.Selection`) returns (per-token losses [b, s], bool mask [b, s]): the
        head and the cross-entropy run only on the selected positions, whose hidden states are
        gathered first; unselected positions hold 0 (unless `select.full_loss`, then all are computed).
        With `loss_mask` (the training objective) the terms beyond the next-token loss are left in
        `self.aux_terms` (see `collect_aux`).
        """
        h = self.hidden_states(tokens)
        out = self.readout(h, labels, select)
        self.collect_aux(h, labels, loss_mask)
        return out

    def collect_aux(self, h: torch.Tensor, labels: torch.Tensor | None, loss_mask: torch.Tensor | None) -> None:
        """`self.aux_terms` = {name: (weight, scalar loss with gradient)} for the trainer to add to the
        objective and log: here multi-token prediction; routed models add their router losses. Left on
        the module, as DeepSpeed's MoE leaves `l_aux`, so evaluation calls keep returning bare losses."""
        self.aux_terms = {}
        if loss_mask is not None and labels is not None and self.mtp is not None:
            self.aux_terms["mtp_loss"] = (self.mtp_weight, self.mtp(self, h, labels, loss_mask))

    def readout(self, h: torch.Tensor, labels: torch.Tensor | None, select=None, mask: torch.Tensor | None = None):
        """Logits or losses from final hidden states (see `forward`); `mask` reuses an earlier selection."""
        if labels is None:
            return self.logits(h)
        if select is None or select.full_loss:
            losses = self.token_losses(h, labels)
            return losses if select is None else (losses, mask if mask is not None else select(losses.detach))
        if mask is None:
            mask = select(lambda: self.scoring_losses(h.detach(), labels))
        picked = self.token_losses(h[mask].unsqueeze(0), labels[mask].unsqueeze(0))[0]
        return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked), mask

    def token_losses(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # fp32 softmax whatever the compute dtype: bf16 cross-entropy loses the small differences.
        return vocab_parallel_cross_entropy(self.logits(h).float(), labels)

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


def main(argv=None) -> None:
    """`python -m cherry_megatron.model.gpt PRESET_OR_YAML [--set k=v ...]`: the parameter count, analytic
    and counted on a meta-device model (shapes only, so the 1B preset costs no memory)."""
    import argparse
    import json

    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig, load_config
    from cherry_megatron.errors import cli_errors

    p = argparse.ArgumentParser(description="parameter count of a preset")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args(argv)
    with cli_errors():
        from cherry_megatron.model import build_model, parameter_count

        cfg = load_config(args.config, args.overrides)
        if cfg.model.vocab_size == 0:  # the trainer takes it from the tokenizer; count the preset's default
            cfg.model.vocab_size = pad_vocab(8192, cfg.model.make_vocab_size_divisible_by, 1)
        distributed.init(ParallelConfig())
        try:
            with torch.device("meta"):
                counted = sum(t.numel() for t in build_model(cfg).parameters())
        finally:
            distributed.shutdown()
        print(json.dumps({**parameter_count(cfg), "counted": counted, "vocab_size": cfg.model.vocab_size}))


if __name__ == "__main__":
    main()
