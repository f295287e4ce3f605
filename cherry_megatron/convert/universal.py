"""DeepSpeed training checkpoint -> DeepSpeed universal checkpoint (weights and optimizer state per
parameter, unsharded), which a run resumes at another DP/TP layout with `train.universal_from`.

DeepSpeed's `ds_to_universal` does the work; what it needs from us is how each weight is split over TP
(`UNIVERSAL_CHECKPOINT_INFO`, Megatron-DeepSpeed's patterns), written here as one exact-name pattern per
parameter from the layout the model's parameters declare (`model.layout_table`), and two workarounds for
0.19.8 (`compat.universal_conversion`).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

from deepspeed.checkpoint import constants as c

from cherry_megatron import compat
from cherry_megatron.checkpoint.consolidate import resolve_tag_dir
from cherry_megatron.checkpoint.run_dir import config_diffs
from cherry_megatron.config import Config, flatten
from cherry_megatron.convert import safe_load
from cherry_megatron.convert.checkpoint import routed_experts
from cherry_megatron.errors import CheckpointError, ConfigError
from cherry_megatron.model import layout_table

def universal_info(cfg: dict) -> dict:
    """DeepSpeed's patterns for the model of `cfg`: replicated weights, weights split along dim 1 (row
    parallel) and fused [a; b] weights split per half; the rest are split along dim 0 (its default)."""
    table = layout_table(cfg)
    # Exact names, after any prefix DeepSpeed may put in front (it matches with re.match).
    names = lambda want: [r"(.*\.)?" + re.escape(n) + "$" for n, layout in table.items() if layout == want]  # noqa: E731
    other = {n: layout for n, layout in table.items() if layout not in (None, (1, 1), (0, 1), (0, 2))}
    if other:  # a split ds_to_universal has no pattern for (only dense models get here: check_supported)
        raise CheckpointError(f"no universal-checkpoint pattern for {next(iter(other))} split as {next(iter(other.values()))}")
    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: names(None),
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: names((1, 1)),
            c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: names((0, 2))}


def check_supported(cfg: dict, tag_dir: Path) -> None:
    if cfg["recurrent"]["num_blocks"] or routed_experts(cfg) or cfg["moee"]["mtp_depth"]:
        raise CheckpointError(f"{tag_dir}: universal checkpoints are supported for dense models (the per-position "
                              "LoRA stacks and routed experts have no universal TP patterns yet)")
    if cfg["parallel"]["pp"] > 1:
        raise CheckpointError(f"{tag_dir}: a pipelined (PP>1) run cannot go to universal here: its parameter "
                              "names are per stage layout; convert to deepspeed or torch instead")


def write_universal(source: str | Path, out: Path) -> str:
    """`out`/<tag>/ (mp_rank files, zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt) and
    `out`/latest_universal; returns the tag."""
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
        with compat.universal_conversion(universal_info(cfg), safe_load._safe) as convert, \
                contextlib.redirect_stdout(sys.stderr):
            convert(args)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    (out / "latest_universal").write_text(tag_dir.name)
    return tag_dir.name


def check_universal(path: Path, cfg: Config) -> None:
    """A universal checkpoint resumes a run of the same config at any parallel layout: refuse one of
    another run (or none) with one line, before DeepSpeed's loader fails deep inside."""
    latest = path / "latest_universal"
    tag = latest.read_text().strip() if latest.is_file() else ""
    files = sorted((path / tag).glob("mp_rank_*_model_states.pt")) if tag else []
    if not files or not (path / tag / "zero").is_dir():
        raise CheckpointError(f"train.universal_from={path} is not a universal checkpoint "
                              f"(expected latest_universal and <tag>/zero/; see tools/convert_checkpoint.py)")
    saved = flatten(safe_load.load(files[0]).get("cherry_config") or {})
    diffs = config_diffs(saved, flatten(cfg.to_dict()),
                          lambda k: k.startswith("parallel.") or k in ("train.universal_from", "model.init_from"))
    if diffs:
        k = diffs[0]
        raise ConfigError(f"train.universal_from={path} holds a run with {k}={saved.get(k)!r}, requested "
                          f"{flatten(cfg.to_dict()).get(k)!r}: only the parallel layout may change on a universal resume")
