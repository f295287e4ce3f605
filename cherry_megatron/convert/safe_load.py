"""Loading DeepSpeed's `.pt` files without running pickled code.

`torch.load(weights_only=True)` refuses any class it does not know; DeepSpeed's optimizer files hold
three plain data classes, allow-listed here by name. DeepSpeed's own tools (`zero_to_fp32`,
`ds_to_universal`) call `torch.load(weights_only=False)`; `weights_only_loads()` makes those calls
weights-only too, so a checkpoint that smuggles a callable fails to load instead of running it.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from cherry_megatron import compat
from cherry_megatron.errors import CheckpointError


def _allowed() -> list:
    return [ZeroStageEnum, LossScaler, fragment_address]


_torch_load = torch.load
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")
# The weights-only unpickler's reasons for a callable or class it would have had to run; any other reason
# ("Unsupported operand", "Can only append to lists") is a corrupt stream.
_CODE_REFUSALS = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build")


def _safe(f, *args, **kwargs):
    kwargs["weights_only"] = True
    kwargs.setdefault("map_location", "cpu")
    allowed = _allowed()  # outside the try: a DeepSpeed that fails to import is a broken install, not a bad file
    try:
        with torch.serialization.safe_globals(allowed):
            return _torch_load(f, *args, **kwargs)
    except Exception as e:
        # Broad on purpose, and around nothing but torch.load: a weights-only load runs a restricted pickle
        # machine over the file's bytes, so corrupt bytes surface as whatever that machine or an allow-listed
        # rebuild function trips over. Fuzzing truncated and flipped files gave RuntimeError (zip reader),
        # UnpicklingError, EOFError, UnicodeDecodeError/ValueError, KeyError (memo), IndexError (stack),
        # TypeError (rebuild arguments), AssertionError (persistent ids) and struct.error: each means "this file".
        raise _refusal(f, e) from None


def _refusal(path, e: Exception) -> CheckpointError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, pickle.UnpicklingError):  # torch wraps the unpickler's reason in lines of its own advice
        lines = [ln for ln in lines if not ln.startswith(_TORCH_ADVICE)] or lines
        if lines and any(m in lines[0] for m in _CODE_REFUSALS):
            return CheckpointError(f"{path} holds pickled code, refused: {lines[0]}")
    reason = lines[0] if lines else type(e).__name__
    return CheckpointError(f"cannot read {path} (truncated or not a checkpoint): {reason}")


def load(path: str | Path, mmap: bool = True):
    """A `.pt` file's contents, tensors memory-mapped (read from disk when touched, not all at once)."""
    return _safe(str(path), mmap=mmap)


def weights_only_loads():
    """Every `torch.load` in this block (DeepSpeed's conversion tools) is weights-only."""
    return compat.torch_load_as(_safe)
