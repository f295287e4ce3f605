"""DeepSpeed training checkpoint -> DeepSpeed universal checkpoint (weights and optimizer state per
parameter, unsharded), which a run resumes at another DP/TP layout with `train.universal_from`.

DeepSpeed's `ds_to_universal` does the work; what it needs from us is how each weight is split over TP
(`UNIVERSAL_CHECKPOINT_INFO`, Megatron-DeepSpeed's patterns), derived here from `layers.TP_LAYOUT`, and
two workarounds for 0.19.8 (each marked below).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from cherry_megatron.checkpoint.consolidate import resolve_tag_dir
from cherry_megatron.convert import safe_load
from cherry_megatron.errors import CheckpointError

# Our names of weights split along dim 1 (row-parallel) and of fused [a; b] weights split per half.
ROW_PARALLEL = [r".*\.attn\.o\.weight$", r".*\.mlp\.down\.weight$"]
TWO_SUB_PARAMS = [r".*\.attn\.kv\.weight$", r".*\.mlp\.gate_up\.weight$"]
REPLICATED = [r"(.*\.)?(attn_norm|mlp_norm|norm)\.weight$"]


def universal_info() -> dict:
    from deepspeed.checkpoint import constants as c

    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: REPLICATED,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: ROW_PARALLEL,
            c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: TWO_SUB_PARAMS}


def check_supported(cfg: dict, tag_dir: Path) -> None:
    if cfg["recurrent"]["num_blocks"] or cfg["moee"]["num_experts"] or cfg["moee"]["mtp_depth"]:
        raise CheckpointError(f"{tag_dir}: universal checkpoints are supported for dense models (the per-position "
                              "LoRA stacks and routed experts have no universal TP patterns yet)")
    if cfg["parallel"]["pp"] > 1:
        raise CheckpointError(f"{tag_dir}: a pipelined (PP>1) run cannot go to universal here: its parameter "
                              "names are per stage layout; convert to deepspeed or torch instead")


@contextlib.contextmanager
def _patched(info: dict):
    """0.19.8 workarounds: (1) a checkpoint that lacks UNIVERSAL_CHECKPOINT_INFO gets ours (DeepSpeed would
    inject an empty one, which treats every weight as split along dim 0); (2) megatron's linear layers keep
    `_extra_state = None` in the module state, on which ds_to_universal calls `.float()`: dropped on load."""
    from deepspeed.checkpoint import ds_to_universal as d
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    def inject(ds_checkpoint):
        if ds_checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO) is None:
            ds_checkpoint.global_state[UNIVERSAL_CHECKPOINT_INFO] = info

    def load(*args, **kwargs):
        out = safe_load._safe(*args, **kwargs)
        if isinstance(out, dict) and isinstance(out.get("module"), dict):
            out["module"] = {k: v for k, v in out["module"].items() if v is not None}
        return out

    import torch

    saved = d._inject_missing_state, torch.load
    d._inject_missing_state, torch.load = inject, load
    try:
        yield
    finally:
        d._inject_missing_state, torch.load = saved


def write_universal(source: str | Path, out: Path) -> str:
    """`out`/<tag>/ (mp_rank files, zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt) and
    `out`/latest_universal; returns the tag."""
    from deepspeed.checkpoint import ds_to_universal as d

    tag_dir = resolve_tag_dir(source)
    meta = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not list(tag_dir.glob("*_optim_states.pt")) or not meta:
        raise CheckpointError(f"{tag_dir} holds no optimizer state (*_optim_states.pt): universal needs a training "
                              "checkpoint, not a converted one")
    cfg = safe_load.load(meta[0]).get("cherry_config")
    if cfg is None:
        raise CheckpointError(f"{tag_dir} is not a cherry_megatron checkpoint (no 'cherry_config' in it)")
    check_supported(cfg, tag_dir)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out / tag_dir.name), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=False, inject_missing_state=True)
    try:  # DeepSpeed reports on stdout, which a CLI keeps for its result
        with _patched(universal_info()), contextlib.redirect_stdout(sys.stderr):
            d.main(args)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    (out / "latest_universal").write_text(tag_dir.name)
    return tag_dir.name
