"""Run under torchrun (2 ranks, PP=2): train a tied-embedding pipeline a few steps, then check that the
first stage's embedding and the last stage's tied copy are still the same tensor, and have moved."""
import torch
import torch.distributed as dist

from cherry_megatron import distributed
from cherry_megatron.config import load_config
from cherry_megatron.engine import build_engine
from cherry_megatron.model.pipeline import build_pipeline

cfg = load_config("tiny", ["model.num_layers=4", "model.vocab_size=1024", "model.tie_embeddings=true", "parallel.pp=2",
                           "train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_length=32"])
layout = distributed.init(cfg.parallel)
torch.manual_seed(0)
engine, _ = build_engine(build_pipeline(cfg, distributed.topology(cfg.parallel, layout.world)), cfg, layout.dp,
                         layout.device)
weight = engine.module.tied_modules["embed"].embed.weight
start = weight.detach().clone()
g = torch.Generator().manual_seed(1)  # the same batches on both stages
for _ in range(4):
    engine.train_batch(iter([(torch.randint(0, 1024, (2, 32), generator=g),
                              (torch.randint(0, 1024, (2, 32), generator=g), torch.ones(2, 32))) for _ in range(2)]))
copies = [torch.empty_like(weight) for _ in range(layout.world)]
dist.all_gather(copies, weight.detach().contiguous())
assert torch.equal(copies[0], copies[1]), (copies[0] - copies[1]).abs().max()
assert not torch.equal(weight.detach(), start)
print(f"rank {layout.rank}: tied embedding identical on both stages after 4 steps, moved by "
      f"{(weight.detach() - start).norm().item():.4f}", flush=True)
distributed.shutdown()
