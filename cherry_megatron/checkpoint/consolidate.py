"""A full (TP=1) model in and out of checkpoints: TP merge/split by the layout the parameters declare
(`model.tp_layout`), the consolidated safetensors format, and loading a full state dict into this
rank's slice of a model. Reading every checkpoint format is `convert/`'s job (`convert.load`), which
builds on this module, never the other way round.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors.torch import save_file

from cherry_megatron.checkpoint.run_dir import latest_tag
from cherry_megatron.errors import CheckpointError
from cherry_megatron.model import build_model
from cherry_megatron.model.tp_layout import key, model_layout, tp_merge, tp_slice


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


def merge_tp(shards: list[dict[str, torch.Tensor]], layout) -> dict[str, torch.Tensor]:
    """Full tensors from per-TP-rank state dicts; `layout(name)` is a `tp_layout.Table`."""
    if len(shards) == 1:
        return dict(shards[0])
    return {name: first if layout(name) is None else tp_merge([s[name] for s in shards], *layout(name))
            for name, first in shards[0].items()}


def split_tp(full: dict[str, torch.Tensor], tp: int, rank: int, layout) -> dict[str, torch.Tensor]:
    """The inverse of `merge_tp` for one rank."""
    out = {}
    for name, t in full.items():
        layout_ = layout(name)
        if layout_ is None or tp == 1:
            out[name] = t
            continue
        out[name] = tp_slice(t, *layout_, tp, rank)
    return out


CONSOLIDATED_WEIGHTS, CONSOLIDATED_CONFIG = "model.safetensors", "cherry_config.json"


def save_consolidated(out_dir: str | Path, state: dict[str, torch.Tensor], cfg_dict: dict) -> None:
    """A full (TP=1) model as safetensors + its config, written to a temp dir and renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists already; refusing to overwrite it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / CONSOLIDATED_WEIGHTS))
    (tmp / CONSOLIDATED_CONFIG).write_text(json.dumps(cfg_dict, indent=1))
    tmp.rename(out_dir)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, fresh: tuple[str, ...] = (),
              dp_group=None) -> None:
    """Load a full (TP=1) state dict into this rank's slice of `model`; a checkpoint of another model
    shape is one clear error, not a traceback. Parameters under the `fresh` prefixes may be missing
    from the checkpoint (modules added for this run, e.g. MTP); they keep their initialisation. A model
    built under ZeRO-3's `zero.Init` (weights partitioned over `dp_group`) is loaded one gathered weight at a time."""

    # Split as this model's own parameters are; a name it lacks passes whole and is reported below.
    table = model_layout(model)
    local = split_tp(state, parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_tensor_model_parallel_rank(), lambda n: table.get(key(n)))
    if hasattr(model, "localize_state"):  # routed models keep only this rank's experts
        local = model.localize_state(local)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return _load_partitioned(model, local, source, fresh, dp_group)
    try:
        missing, unexpected = model.load_state_dict(local, strict=False)
    except RuntimeError as e:  # size mismatches
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise CheckpointError(f"{source} is a checkpoint of another model shape: {detail}") from None
    _check_fit(source, [k for k in missing if not k.endswith("_extra_state") and not k.startswith(fresh)], unexpected)


def _check_fit(source: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _load_partitioned(model, local: dict, source: str, fresh: tuple[str, ...], dp_group) -> None:
    """Each partitioned weight gathered whole, written by every rank from the same full state, re-partitioned
    on release: one weight's full size at a time. (load_state_dict would see the empty partition tensors.)"""
    import deepspeed
    import torch.distributed as dist

    names = dict(model.named_parameters())
    _check_fit(source, [n for n in names if n not in local and not n.startswith(fresh)],
               [n for n in local if n not in names and not n.endswith("_extra_state")])
    wrong = next((n for n, p in names.items() if n in local and tuple(local[n].shape) != tuple(p.ds_shape)), None)
    if wrong:
        raise CheckpointError(f"{source} is a checkpoint of another model shape: {wrong} is "
                              f"{tuple(local[wrong].shape)}, the model's {tuple(names[wrong].ds_shape)}")
    first = dist.get_global_rank(dp_group, 0) if dp_group is not None else 0
    for name, p in names.items():
        if name in local:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=first):
                p.data.copy_(local[name])


def build_loaded(cfg, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The model `cfg` describes, this rank's slice of the full `state` loaded into it, in eval mode."""

    model = build_model(cfg)
    load_into(model, state, source)
    return model.eval()
