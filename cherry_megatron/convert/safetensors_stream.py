"""A safetensors file written one tensor at a time.

`safetensors.torch.save_file` takes the whole state dict in memory; a converter that merges TP slices
tensor by tensor would then hold the model. The format is a little-endian u64 header length, a JSON
header (dtype, shape, byte offsets per tensor) and the raw bytes in header order, so knowing every
tensor's dtype and shape up front is enough to write the header first and stream the data after it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsWriter:
    """`specs` = [(name, dtype, shape)] in file order; then `write(name, tensor)` in that same order."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        header, offset = {}, 0
        for name, dtype, shape in specs:
            n = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.order = [s[0] for s in specs]
        self.specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.done = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        expected = self.order[self.done]
        if name != expected or (t.dtype, tuple(t.shape)) != self.specs[name]:
            raise ValueError(f"safetensors stream: got {name} {t.dtype} {tuple(t.shape)}, "
                             f"expected {expected} {self.specs[expected]}")
        self.f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self.done += 1

    def close(self) -> None:
        self.f.close()
        if self.done != len(self.order):
            raise ValueError(f"safetensors stream closed after {self.done} of {len(self.order)} tensors")
