"""Run under torchrun (4 ranks): load converted DeepSpeed checkpoints the way a training layout loads them
and compute logits, printing each layout's largest difference from the reference (TP=1) logits.

    python -m tests.check_convert REFERENCE.pt LAYOUT=DIR ...   (LAYOUT as TPxPP, e.g. 4x1 2x2)

TP-only layouts load their own rank's `mp_rank_XX_model_states.pt` strictly into the TP-sliced model (as
DeepSpeed's load_module_only does, no merging); pipelines go through DeepSpeed's own
`PipelineModule.load_state_dir` and run stage by stage, hidden states sent to the next stage.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cherry_megatron import distributed
from cherry_megatron.config import from_dict
from cherry_megatron.convert.safe_load import load
from cherry_megatron.model import build_model
from cherry_megatron.model.pipeline import build_pipeline


def gather_vocab(x: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits -> full ones (megatron's gather allocates on CUDA)."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


ref = torch.load(sys.argv[1], weights_only=True)
tokens, expected = ref["tokens"], ref["logits"]
for spec in sys.argv[2:]:
    layout_name, path = spec.split("=", 1)
    tp, pp = (int(x) for x in layout_name.split("x"))
    tag_dir = Path(path) / (Path(path) / "latest").read_text().strip()
    meta = load(tag_dir / "mp_rank_00_model_states.pt")
    cfg = from_dict(meta["cherry_config"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (tp, pp), (cfg.parallel, spec)
    layout = distributed.init(cfg.parallel)
    torch.manual_seed(123)  # a different init than the checkpoint's: every weight must come from the files
    model = build_model(cfg)
    if pp == 1:
        own = load(tag_dir / f"mp_rank_{layout.tp_rank:02d}_model_states.pt")["module"]
        model.load_state_dict(own, strict=True)
        model.eval()
        with torch.no_grad():
            logits = gather_vocab(model(tokens).logits)
    else:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        topo = distributed.topology(cfg.parallel, layout.world)
        pipe = build_pipeline(cfg, topo, model)
        pipe.load_state_dir(str(tag_dir), checkpoint_engine=TorchCheckpointEngine())
        pipe.eval()
        stage = topo.get_coord(layout.rank).pipe
        peer = lambda s: topo.filter_match(pipe=s, data=topo.get_coord(layout.rank).data,  # noqa: E731
                                           model=topo.get_coord(layout.rank).model)[0]
        with torch.no_grad():
            x = tokens
            if stage > 0:
                x = torch.empty(*tokens.shape, cfg.model.hidden_size)
                dist.recv(x, src=peer(stage - 1))
            out = pipe(x)
            if stage < pp - 1:
                dist.send(out.contiguous(), dst=peer(stage + 1))
                logits = None
            else:
                logits = gather_vocab(out)
    diff = (logits - expected).abs().max().item() if logits is not None else None
    sys.stdout.write(json.dumps({"layout": layout_name, "rank": layout.rank, "max_abs_diff": diff}) + "\n")
    sys.stdout.flush()
    dist.barrier()
    parallel_state.destroy_model_parallel()
distributed.shutdown()
