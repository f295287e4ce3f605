"""Run under torchrun (4 ranks): build the real sharded model for each layout TPxPP given and print, per
rank, the parameters it holds next to cherry-plan's count for its stage (cherry_megatron/cli/plan.py). A
layout ending in "p" cuts the stages by parameter count (parallel.pipeline_partition=parameters); one with "t" ties the embeddings.""" 
import json
import sys

import torch
from megatron.core import parallel_state

from cherry_megatron import distributed
from cherry_megatron.config import load_config
from cherry_megatron.model import build_model
from cherry_megatron.model.pipeline import build_pipeline
from cherry_megatron.cli.plan import rank_parameters

for spec in sys.argv[1:]:
    partition = "parameters" if "p" in spec else "layers"
    tp, pp = (int(x) for x in spec.rstrip("pt").split("x"))
    cfg = load_config("tiny", ["model.num_layers=5", "model.vocab_size=1024", f"parallel.tp={tp}", f"parallel.pp={pp}",
                               f"parallel.pipeline_partition={partition}", f"model.tie_embeddings={'t' in spec}"])
    layout = distributed.init(cfg.parallel)
    torch.manual_seed(0)
    if pp > 1:
        topo = distributed.topology(cfg.parallel, layout.world)
        model, stage = build_pipeline(cfg, topo), topo.get_coord(layout.rank).pipe
    else:
        model, stage = build_model(cfg), 0
    held = sum(p.numel() for p in model.parameters())
    sys.stdout.write(json.dumps({"layout": spec, "rank": layout.rank, "stage": stage, "held": held,
                                 "planned": rank_parameters(cfg.model, tp, pp, stage, partition),
                                 "blocks": sum(type(m).__name__ == "BlockStage" for m in model.modules())}) + "\n")  # one write per line
    sys.stdout.flush()
    parallel_state.destroy_model_parallel()
distributed.shutdown()
