"""Training batches: megatron-core's GPTDataset (blended, cached indices) and a deterministic sampler.

The sample a rank reads is a pure function of (step, micro-batch, data-parallel rank), as in
Megatron-LM's pretraining sampler: a resumed run needs only its step count to continue the same data
order, and runs with different DP/TP layouts see the same global batches.
"""
from __future__ import annotations

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list

from cherry_megatron.config import Config
from cherry_megatron.data.blend import Shares, language_names


class TrainData:
    def __init__(self, cfg: Config, tokenizer, dp_rank: int, dp: int, cache_dir: str):
        blend = get_blend_from_list([str(p) for p in cfg.data.paths])
        t = cfg.train
        self.mbs, self.gbs, self.dp_rank, self.dp = t.micro_batch_size, t.global_batch_size, dp_rank, dp
        self.grad_accum = self.gbs // (self.mbs * dp)
        self.shuffle_seed = t.seed if cfg.data.shuffle_tokens else None
        self.eod = tokenizer.eod if cfg.data.eod_mask_loss else None
        gcfg = GPTDatasetConfig(
            random_seed=t.seed, sequence_length=t.seq_length, blend_per_split=[blend, None, None],
            path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=cfg.data.eod_mask_loss, create_attention_mask=False)
        # Every rank builds (rank 0 first, writing the index cache; the builder synchronises).
        self.dataset, _, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [t.steps * self.gbs, 0, 0], lambda: True, gcfg).build()
        blended = isinstance(self.dataset, BlendedDataset)
        parts = self.dataset.datasets if blended else [self.dataset]
        self.shares = Shares(language_names(cfg.data), self.dataset.dataset_index if blended else None,
                             [int(d.dataset.sequence_lengths[d.indices].sum()) for d in parts], t.seq_length)

    def sample_index(self, step: int, micro: int) -> int:
        """Global index of the micro-batch's first sample: the same on all TP ranks, distinct across DP ranks."""
        return step * self.gbs + (micro * self.dp + self.dp_rank) * self.mbs

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        start = self.sample_index(step, micro)
        items = [self.dataset[i] for i in range(start, start + self.mbs)]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask")}
        return batch if self.shuffle_seed is None else self._shuffled(batch, start)

    def _shuffled(self, batch: dict, start: int) -> dict:
        """Each sample's s+1 tokens in a random order (seeded by sample index): the same unigram
        statistics with no sequential structure, the control for SGT's gradient coupling."""
        text = torch.cat([batch["tokens"][:, :1], batch["labels"]], dim=1)
        for i in range(len(text)):
            g = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + start + i)
            text[i] = text[i][torch.randperm(text.shape[1], generator=g)]
        labels = text[:, 1:]
        mask = torch.ones_like(labels, dtype=batch["loss_mask"].dtype) if self.eod is None else (labels != self.eod).to(
            batch["loss_mask"].dtype)
        return {"tokens": text[:, :-1].contiguous(), "labels": labels.contiguous(), "loss_mask": mask}
