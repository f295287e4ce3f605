"""One full (TP=1) fp32 state dict from a DeepSpeed training checkpoint of our models.

ZeRO 0-2 keep whole module weights per TP rank in `mp_rank_XX_model_states.pt`; we merge the TP
slices by the layout the layers declare (`model.layers.tp_layout`). ZeRO-3 keeps them only in the
flat optimizer partitions, which DeepSpeed's own `zero_to_fp32` gathers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cherry_megatron.checkpoint.run_dir import latest_tag
from cherry_megatron.errors import CheckpointError
from cherry_megatron.model.layers import tp_layout, tp_slice


def resolve_tag_dir(path: str | Path) -> Path:
    """A run dir, a checkpoints dir, or a tag dir -> the tag dir."""
    path = Path(path)
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir / tag
    if _model_state_files(path):
        return path
    raise CheckpointError(f"no checkpoint at {path} (expected a run dir, its checkpoints/ with 'latest', or a tag dir)")


def merge_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for name, first in shards[0].items():
        layout = tp_layout(name)
        if layout is None:
            out[name] = first
            continue
        dim, stride = layout
        # A strided weight holds `stride` interleaved blocks per rank (e.g. [k_r; v_r]); regroup by block.
        blocks = [torch.chunk(s[name], stride, dim=dim) for s in shards]
        out[name] = torch.cat([b[i] for i in range(stride) for b in blocks], dim=dim)
    return out


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


def _model_state_files(tag_dir: Path) -> list[Path]:
    """One model-states file per TP rank: `mp_rank_XX_...` (ZeRO 0-2) or data-parallel rank 0's
    `zero_pp_rank_0_mp_rank_XX_...` (ZeRO-3, whose per-DP-rank copies are identical but for shards)."""
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    return files or sorted(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))


def load_model_states(tag_dir: Path) -> list[dict]:
    files = _model_state_files(tag_dir)
    if not files:
        raise CheckpointError(f"{tag_dir} holds no mp_rank_*_model_states.pt files")
    states = []
    for f in files:
        try:
            # weights_only: a checkpoint is data; never run code found in it.
            states.append(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} (truncated or not a checkpoint): {str(e).splitlines()[0]}") from None
    return states


def load_expert_states(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Routed experts, which DeepSpeed saves apart from the model states: one file per (layer, global
    expert id, TP rank), under global-id keys; TP slices merge like the dense MLP's."""
    import re

    by_rank: dict[str, dict] = {}
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
        rank = re.search(r"_mp_rank_(\d+)_model_states", f.name).group(1)
        try:
            by_rank.setdefault(rank, {}).update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} (truncated or not a checkpoint): {str(e).splitlines()[0]}") from None
    return merge_tp([by_rank[r] for r in sorted(by_rank)]) if by_rank else {}


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
    """(full fp32 state dict, the run's config dict) for a run dir, a DeepSpeed checkpoint path, or a
    consolidated safetensors dir (`save_consolidated`)."""
    path = Path(path)
    if (path / CONSOLIDATED_WEIGHTS).is_file():
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return ({k: v.float() for k, v in load_file(str(path / CONSOLIDATED_WEIGHTS)).items()},
                    json.loads((path / CONSOLIDATED_CONFIG).read_text()))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read consolidated checkpoint {path}: {str(e).splitlines()[0]}") from None
    tag_dir = resolve_tag_dir(path)
    states = load_model_states(tag_dir)
    cfg = states[0].get("cherry_config")
    if cfg is None:
        raise CheckpointError(f"{tag_dir} is not a cherry_megatron checkpoint (no 'cherry_config' in it)")
    if cfg["parallel"]["zero_stage"] == 3:
        if len(states) > 1:
            raise CheckpointError("ZeRO-3 checkpoints with TP>1 cannot be consolidated yet "
                                  "(tools/convert_checkpoint.py, issue 8, will)")
        # DeepSpeed's tool unpickles its own optimizer files; only use it on checkpoints you wrote.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        sd = merge_tp([s["module"] for s in states])
        sd.update(load_expert_states(tag_dir))
    # megatron's linear layers save an empty `_extra_state` (None) for Transformer Engine; it carries no weights.
    return {k: v.float() for k, v in sd.items() if torch.is_tensor(v) and not k.endswith("._extra_state")}, cfg


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
