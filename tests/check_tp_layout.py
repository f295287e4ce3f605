"""Run under torchrun (2 ranks, TP=2): build each model kind from the seed and check that every parameter of
this rank is the slice of the full (TP=1) model's tensor that the layout table names (`model.layout_table`).
argv: a file of {kind: (sets, full state dict)} saved by tests/test_tp_layout.py from a world of one."""
import json
import sys

import torch

from cherry_megatron import distributed
from cherry_megatron.config import ParallelConfig, load_config
from cherry_megatron.model import build_model, layout_table
from cherry_megatron.model.tp_layout import model_layout, tp_slice

kinds = torch.load(sys.argv[1], weights_only=True)
layout = distributed.init(ParallelConfig(tp=2))
for kind, (preset, sets, full) in kinds.items():
    cfg = load_config(preset, sets + ["parallel.tp=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    table = layout_table(cfg.to_dict())
    local = dict(model.named_parameters())
    wrong = [n for n, p in local.items()
             if not torch.equal(p.detach(), tp_slice(full[n], *table(n), 2, layout.tp_rank) if table(n) else full[n])]
    split = sorted({json.dumps(v) for v in table.values()})
    sys.stdout.write(json.dumps({"kind": kind, "rank": layout.rank, "params": len(local), "full": len(full),
                                 "missing": sorted(set(full) - set(local)), "wrong": wrong, "splits": split,
                                 "same_as_live": model_layout(model) == dict(table)}) + "\n")
    sys.stdout.flush()
distributed.shutdown()
