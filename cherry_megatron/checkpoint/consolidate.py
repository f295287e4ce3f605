"""A full (TP=1) model in and out of checkpoints: TP merge/split by the layout the layers declare
(`model.layers.TP_LAYOUT`), the consolidated safetensors format, and loading a full state dict into this
rank's slice of a model. Reading every checkpoint format is `convert/checkpoint.py`'s job.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cherry_megatron.checkpoint.run_dir import latest_tag
from cherry_megatron.errors import CheckpointError
from cherry_megatron.model.layers import tp_layout, tp_merge, tp_slice


def resolve_tag_dir(path: str | Path) -> Path:
    """A run dir, a checkpoints dir, or a tag dir -> the tag dir."""
    path = Path(path)
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir / tag
    if list(path.glob("*mp_rank_*_model_states.pt")):
        return path
    raise CheckpointError(f"no checkpoint at {path} (expected a run dir, its checkpoints/ with 'latest', or a tag dir)")


def merge_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full tensors from per-TP-rank state dicts, by the layout the layers declare."""
    if len(shards) == 1:
        return dict(shards[0])
    return {name: first if tp_layout(name) is None else tp_merge([s[name] for s in shards], *tp_layout(name))
            for name, first in shards[0].items()}


def split_tp(full: dict[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """The inverse of `merge_tp` for one rank."""
    out = {}
    for name, t in full.items():
        layout = tp_layout(name)
        if layout is None or tp == 1:
            out[name] = t
            continue
        out[name] = tp_slice(t, *layout, tp, rank)
    return out


CONSOLIDATED_WEIGHTS, CONSOLIDATED_CONFIG = "model.safetensors", "cherry_config.json"


def save_consolidated(out_dir: str | Path, state: dict[str, torch.Tensor], cfg_dict: dict) -> None:
    """A full (TP=1) model as safetensors + its config, written to a temp dir and renamed into place."""
    import json
    import shutil

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; refusing to overwrite it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / CONSOLIDATED_WEIGHTS))
    (tmp / CONSOLIDATED_CONFIG).write_text(json.dumps(cfg_dict, indent=1))
    tmp.rename(out_dir)


def load_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 state dict, the run's config dict) for a run dir or DeepSpeed checkpoint at any TP/PP/ZeRO
    stage, a consolidated safetensors dir (`save_consolidated`) or a Hugging Face Llama dir: the readers of
    tools/convert_checkpoint.py, which never unpickle code."""
    from cherry_megatron.convert.checkpoint import read_any

    ck = read_any(path)
    return {name: ck.get(name).float() for name in ck.specs}, ck.cfg


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, fresh: tuple[str, ...] = ()) -> None:
    """Load a full (TP=1) state dict into this rank's slice of `model`; a checkpoint of another model
    shape is one clear error, not a traceback. Parameters under the `fresh` prefixes may be missing
    from the checkpoint (modules added for this run, e.g. MTP); they keep their initialisation."""
    from megatron.core import parallel_state

    local = split_tp(state, parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_tensor_model_parallel_rank())
    if hasattr(model, "localize_state"):  # routed models keep only this rank's experts
        local = model.localize_state(local)
    try:
        missing, unexpected = model.load_state_dict(local, strict=False)
    except RuntimeError as e:  # size mismatches
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise CheckpointError(f"{source} is a checkpoint of another model shape: {detail}") from None
    missing = [k for k in missing if not k.endswith("_extra_state") and not k.startswith(fresh)]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
