"""Opening Megatron `.bin/.idx` files with a clear error when one is missing or truncated."""
from __future__ import annotations

import os

import numpy as np

from cherry_megatron.errors import DataError


def open_indexed(prefix: str):
    """megatron-core's IndexedDataset for `prefix`, after checking both files are whole."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"missing data file {prefix}{ext} (data prefixes name files without the extension)")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:  # struct/numpy errors from a short or foreign header
        raise DataError(f"truncated or corrupt index file {prefix}.idx: {str(e).splitlines()[0]}") from None
    idx = ds.index
    if len(idx.sequence_lengths) == 0:
        raise DataError(f"data file {prefix}.bin holds no documents")
    expected = int(idx.sequence_pointers[-1]) + int(idx.sequence_lengths[-1]) * np.dtype(idx.dtype).itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual < expected:
        raise DataError(f"truncated data file {prefix}.bin: {actual} bytes, its index expects {expected}")
    return ds


def token_stream(prefix: str) -> np.ndarray:
    """All tokens of the file in stored order (documents concatenated as written, EOD included).

    A Megatron .bin is exactly that array, so a memory map of it is the stream; no copy is made.
    """
    ds = open_indexed(prefix)
    n = int(ds.index.sequence_lengths.sum())
    return np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r", shape=(n,))
