"""How each parameter is split over tensor-parallel ranks: read from the parameters themselves.

megatron-core's layers mark every weight they split (`tensor_model_parallel`, `partition_dim`,
`partition_stride`); our own stacked parameters (per-position LoRA, expert LoRA) set the same attributes
where they are created, from the projection they modify (`lora_layouts`). Everything else is replicated.
The converter, the universal-checkpoint patterns, the planner and loading a full model into a TP rank
all read `model.layout_table`: one `Table` per model config, derived from a meta-device model.

A layout is (dim, stride) or None (replicated). A strided weight holds `stride` interleaved blocks per
rank (a fused [k; v] or [gate; up] projection: each rank keeps its k and its v rows).
"""
from __future__ import annotations

import re

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

Layout = tuple  # (dim, stride)

# DeepSpeed's MoE names each expert `...deepspeed_experts.<id>.`; every expert of a layer has the same layout.
_EXPERT_ID = re.compile(r"(\.deepspeed_experts\.)\d+\.")


def key(name: str) -> str:
    """The table's key for a parameter name: expert ids generalised, so a full checkpoint (global ids) and
    one rank's model (local ids) look up the same entry."""
    return _EXPERT_ID.sub(r"\1*.", name)


def of(param: torch.Tensor) -> Layout | None:
    if getattr(param, "tensor_model_parallel", False):
        return (int(param.partition_dim), int(param.partition_stride))
    return None


def model_layout(model: torch.nn.Module) -> dict[str, Layout | None]:
    """{key(name): layout} of every parameter of a built model (any TP degree: the split is the same)."""
    return {key(n): of(p) for n, p in model.named_parameters()}


def lora_layouts(weight: torch.Tensor) -> tuple[Layout | None, Layout | None]:
    """Layouts of the stacked LoRA factors A [positions, r, in] and B [positions, out, r] of a projection
    `weight` [out, in]: B's rows split like a column-parallel weight's rows (with its stride), A's columns
    like a row-parallel weight's columns; the other factor is replicated."""
    layout = of(weight)
    if layout is None:
        return None, None
    dim, stride = layout
    return ((2, stride), None) if dim == 1 else (None, (1, stride))


def mark(param: torch.nn.Parameter, layout: Layout | None) -> torch.nn.Parameter:
    """Give a parameter megatron's TP attributes (DeepSpeed's gradient norm and our tools read them)."""
    if layout is not None:
        set_tensor_model_parallel_attributes(param, True, layout[0], layout[1])
    return param


class Table(dict):
    """{key: layout} with lookup by parameter name; a name the model does not have is an error, not
    silently replicated."""

    def __call__(self, name: str) -> Layout | None:
        try:
            return self[key(name)]
        except KeyError:
            raise KeyError(f"{name} is not a parameter of this model (no TP layout)") from None


def tp_slice(t: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s slice of a full tensor split over `tp` ranks along `dim`."""
    if tp == 1:
        return t
    blocks = torch.chunk(t, stride, dim=dim)
    return torch.cat([torch.chunk(b, tp, dim=dim)[rank] for b in blocks], dim=dim).clone()


def tp_merge(slices: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from its TP slices (rank order): the inverse of `tp_slice`."""
    blocks = [torch.chunk(s, stride, dim=dim) for s in slices]
    return torch.cat([b[i] for i in range(stride) for b in blocks], dim=dim)


def merged_shape(shapes: list[tuple], layout: Layout | None) -> tuple:
    if layout is None or len(shapes) == 1:
        return tuple(shapes[0])
    out = list(shapes[0])
    out[layout[0]] = sum(s[layout[0]] for s in shapes)
    return tuple(out)
