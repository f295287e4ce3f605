"""Run under torchrun (2 ranks, TP=2): each SGT sampling mode draws the same positions with the same weights on
both tensor-parallel ranks, the loss policy scoring from the vocab-parallel cross-entropy. Rank 0 prints `same MODE`
for each mode whose masks and weights are equal bit for bit on both ranks."""
import torch
import torch.distributed as dist

from cherry_megatron import distributed
from cherry_megatron.config import ParallelConfig, load_config
from cherry_megatron.model import build_model
from cherry_megatron.sgt import LossPolicy, Selection

layout = distributed.init(ParallelConfig(tp=2))
cfg = load_config("tiny", ["model.vocab_size=1024", "model.num_layers=2", "parallel.tp=2"])
torch.manual_seed(0)
model = build_model(cfg)
g = torch.Generator().manual_seed(1)
tokens, labels = torch.randint(0, 1024, (3, 48), generator=g), torch.randint(0, 1024, (3, 48), generator=g)
valid = torch.rand(3, 48, generator=g) > 0.2
for mode in ("top", "poisson", "conditional"):
    sel = Selection(LossPolicy(), 0.15, "sequence", labels, valid, key=7, sampling=mode, seed=3)
    out = model(tokens, labels, select=sel)
    weight = out.weight if out.weight is not None else out.mask.float()
    mine = torch.cat([out.mask.double().reshape(-1), weight.double().reshape(-1)])
    theirs = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(theirs, mine)
    if torch.equal(theirs[0], theirs[1]) and out.mask.any() and layout.rank == 0:
        print(f"same {mode}", flush=True)
distributed.shutdown()
