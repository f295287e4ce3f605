"""Run under torchrun (2 ranks, TP=2) with an output path: each rank's vocab-parallel KL on its half of the
vocabulary of fixed logits, and its gradient, are gathered and saved by rank 0 (safetensors: `kl` [3, 16],
`grad` [3, 16, 1024]) for tests/test_distill.py to hold against the KL computed with the whole vocabulary."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cherry_megatron import distributed
from cherry_megatron.config import ParallelConfig
from cherry_megatron.losses import vocab_parallel_kl


def logits():
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(3, 16, 1024, generator=g), 2 * torch.randn(3, 16, 1024, generator=g)


TAU = 2.0

if __name__ == "__main__":
    layout = distributed.init(ParallelConfig(tp=2))
    student, teacher = logits()
    half = slice(layout.rank * 512, (layout.rank + 1) * 512)
    mine = student[..., half].clone().requires_grad_(True)
    kl = vocab_parallel_kl(mine, teacher[..., half], TAU)
    kl.sum().backward()
    kls, grads = [torch.empty_like(kl) for _ in range(2)], [torch.empty_like(mine.grad) for _ in range(2)]
    dist.all_gather(kls, kl.detach().contiguous())
    dist.all_gather(grads, mine.grad.contiguous())
    if layout.rank == 0:
        assert torch.equal(kls[0], kls[1]), "the ranks' KLs differ"
        save_file({"kl": kls[0], "grad": torch.cat(grads, -1)}, sys.argv[1])
    distributed.shutdown()
