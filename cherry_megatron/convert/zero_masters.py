"""The fp32 master weights of a ZeRO-1/2 checkpoint, read from its optimizer partitions.

In bf16 (or fp16) a ZeRO-1/2 run saves the module weights in bf16 and the fp32 masters only in the optimizer
files, each data-parallel rank its contiguous slice of every group's flat buffer. ZeRO-3 keeps weights only
there, so a reader that took the module weights would give a stage-dependent model: every tool that loads
a checkpoint (init_from, compression, evaluation, exports) reads the masters instead. DeepSpeed's
`zero_to_fp32` cannot do it here: it refuses BF16_Optimizer files (no `zero_stage` key in them) and the
pipeline engine's per-stage files. Both optimizers save `single_partition_of_fp32_groups` with
`param_slice_mappings` (name -> fragment of the rank's flat partition), which is all a reader needs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from cherry_megatron.convert import safe_load
from cherry_megatron.errors import CheckpointError

_DP_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def optimizer_files(tag_dir: Path) -> dict[int, list[Path]]:
    """mp rank -> its optimizer files in data-parallel rank order (`bf16_` prefixed for BF16_Optimizer)."""
    by_mp: dict[int, dict[int, Path]] = {}
    for f in tag_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"):
        m = _DP_RANK.search(f.name)
        if m:
            by_mp.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    return {mp: [ranks[d] for d in sorted(ranks)] for mp, ranks in sorted(by_mp.items())}


def fp32_masters(files: list[Path], shape_of: Callable[[str], tuple | None]) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a function giving its fp32 master (concatenated over the data-parallel files, one tensor when
    called), for the names the optimizer holds and `shape_of` knows (None: not wanted); {} when the files hold no flat fp32 partitions
    (ZeRO-0 keeps its weights in the module). Names are the engine's `named_parameters`; routed experts of an
    expert-parallel run are left out (their groups are partitioned over expert-data-parallel ranks, and the
    module's expert files keep them)."""
    pieces: dict[str, list[tuple[torch.Tensor, int, int]]] = {}
    for f in files:
        st = safe_load.load(f)
        osd = st.get("optimizer_state_dict") if isinstance(st, dict) else None
        if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
            return {}
        flats, mappings = osd["single_partition_of_fp32_groups"], osd.get("param_slice_mappings")
        base = osd.get("base_optimizer_state")
        groups = base.get("param_groups") if isinstance(base, dict) else None
        groups = groups if isinstance(groups, list) and len(groups) == len(flats) else [{}] * len(flats)
        if not isinstance(mappings, list) or len(mappings) != len(flats):
            raise CheckpointError(f"{f}: fp32 partitions without their parameter mappings")
        for flat, mapping, group in zip(flats, mappings, groups):
            if group.get("moe") and not str(group.get("name", "")).endswith("ep_size_1"):
                continue
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append((flat, frag.start, frag.numel))
    out = {}
    for name, parts in pieces.items():
        shape = shape_of(name)
        if shape is None:
            continue
        numel = torch.Size(shape).numel()
        if sum(n for _, _, n in parts) != numel:
            raise CheckpointError(f"{files[0].parent}: the fp32 partitions of {name} hold "
                                  f"{sum(n for _, _, n in parts)} values, its shape {tuple(shape)} needs {numel}")
        out[name] = (lambda parts=parts, shape=tuple(shape):
                     torch.cat([flat.narrow(0, start, n) for flat, start, n in parts]).float().view(shape))
    return out
