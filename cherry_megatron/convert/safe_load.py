"""Loading DeepSpeed's `.pt` files without running pickled code.

`torch.load(weights_only=True)` refuses any class it does not know; DeepSpeed's optimizer files hold
three plain data classes, allow-listed here by name. DeepSpeed's own tools (`zero_to_fp32`,
`ds_to_universal`) call `torch.load(weights_only=False)`; `weights_only_loads()` makes those calls
weights-only too, so a checkpoint that smuggles a callable fails to load instead of running it.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from cherry_megatron.errors import CheckpointError


@functools.cache
def _allowed() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


_torch_load = torch.load


def _safe(*args, **kwargs):
    kwargs["weights_only"] = True
    kwargs.setdefault("map_location", "cpu")
    with torch.serialization.safe_globals(_allowed()):
        return _torch_load(*args, **kwargs)


def load(path: str | Path, mmap: bool = True):
    """A `.pt` file's contents, tensors memory-mapped (read from disk when touched, not all at once)."""
    try:
        return _safe(str(path), mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in first.lower():
            first = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), first)
            raise CheckpointError(f"{path} holds pickled code, refused: {first}") from None
        raise CheckpointError(f"cannot read {path} (truncated or not a checkpoint): {first}") from None


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` in this block (DeepSpeed's conversion tools) is weights-only."""
    torch.load = _safe
    try:
        yield
    finally:
        torch.load = _torch_load
