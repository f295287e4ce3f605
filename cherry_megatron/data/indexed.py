"""Opening Megatron `.bin/.idx` files with a clear error when one is missing, truncated or corrupt."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from cherry_megatron.errors import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count: 34 bytes
# megatron's DType codes that hold token ids (6, 7 are float64/float32: not token data)
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


def _check_index(prefix: str) -> None:
    """The .idx header and arrays are consistent with each other and with the .bin's size.

    megatron's IndexedDataset assigns `self.index` last, after parsing, and its `__del__` deletes it
    unconditionally: constructing one on a bad file raises, then leaves a half-built object whose `__del__`
    prints "Exception ignored ... AttributeError" at garbage collection (an empty .bin does the same to its
    _MMapBinReader). So every file is checked here first and only a whole pair reaches the constructor. The
    checks also catch what megatron would accept: counts that disagree with the file size, pointers that
    are not the running sum of the lengths, a .bin of another size than its index says.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"

    def bad(why: str) -> DataError:
        return DataError(f"truncated or corrupt index file {idx}: {why}")

    try:
        size = os.path.getsize(idx)
        with open(idx, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise DataError(f"cannot read {idx}: {e.strerror}") from None
    if len(head) < _HEADER.size:
        raise bad(f"{size} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if magic != _MAGIC or version != 1:
        raise bad("not a Megatron MMIDIDX version-1 index")
    if code not in _TOKEN_DTYPES:
        raise bad(f"dtype code {code} is not an integer token type")
    dtype = np.dtype(_TOKEN_DTYPES[code])
    arrays = _HEADER.size + 12 * n_seq + 8 * n_doc  # int32 lengths, int64 pointers, int64 document indices
    if size not in (arrays, arrays + n_seq):  # + n_seq: a multimodal index's int8 modes
        raise bad(f"{size} bytes, its header ({n_seq} sequences, {n_doc} document bounds) needs {arrays}")
    if n_seq == 0:
        raise DataError(f"data file {bin_} holds no documents")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = mm[_HEADER.size:_HEADER.size + 4 * n_seq].view(np.int32).astype(np.int64)
    pointers = mm[_HEADER.size + 4 * n_seq:_HEADER.size + 12 * n_seq].view(np.int64)
    docs = mm[_HEADER.size + 12 * n_seq:arrays].view(np.int64)
    if (lengths < 0).any():
        raise bad("a negative sequence length")
    starts = np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize
    if not np.array_equal(pointers, starts):
        raise bad("sequence pointers disagree with the sequence lengths")
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise bad("document indices are not a rising sequence from 0 to the sequence count")
    expected = int(starts[-1] + lengths[-1] * dtype.itemsize)
    actual = os.path.getsize(bin_)
    if actual < expected:
        raise DataError(f"truncated data file {bin_}: {actual} bytes, its index expects {expected}")
    if actual > expected:
        raise DataError(f"data file {bin_} is {actual} bytes, its index expects {expected}: "
                        "the .bin and .idx are not one pair")
    if expected == 0:
        raise DataError(f"data file {bin_} holds no tokens")


def open_indexed(prefix: str):
    """megatron-core's IndexedDataset for `prefix`, after checking both files are whole."""

    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"missing data file {prefix}{ext} (data prefixes name files without the extension)")
    _check_index(prefix)
    return IndexedDataset(prefix, mmap=True)


def token_stream(prefix: str) -> np.ndarray:
    """All tokens of the file in stored order (documents concatenated as written, EOD included).

    A Megatron .bin is exactly that array, so a memory map of it is the stream; no copy is made.
    """
    ds = open_indexed(prefix)
    n = int(ds.index.sequence_lengths.sum())
    return np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r", shape=(n,))


def write_meta(prefix: str, tokenizer: str, vocab_size: int, eod: int) -> None:
    """PREFIX.meta.json: the tokenizer the data was made with (its fingerprint), read by `check_tokenizer`."""
    from cherry_megatron.data.tokenizer import fingerprint, kind

    meta = {"tokenizer": os.path.abspath(tokenizer), "kind": kind(tokenizer), "sha256": fingerprint(tokenizer),
            "vocab_size": int(vocab_size), "eod": int(eod)}
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)


def read_meta(prefix: str) -> dict | None:
    try:
        with open(prefix + ".meta.json") as f:
            return json.load(f)
    except FileNotFoundError:
        return None  # data made before the meta file existed, or by another tool (Megatron-LM's preprocess)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {prefix}.meta.json: {e}") from None


def check_tokenizer(prefix: str, tokenizer: str, who: str) -> None:
    """Data made with another tokenizer than `tokenizer` (the model's) is one clear error. Without a meta file
    nothing is known beyond the vocabulary range, which the callers check."""
    meta = read_meta(prefix)
    if meta is None or not tokenizer:
        return
    from cherry_megatron.data.tokenizer import fingerprint

    try:
        ours = fingerprint(tokenizer)
    except OSError:
        return  # the model's tokenizer file is gone; load_tokenizer reports that where it is needed
    if meta.get("sha256") != ours:
        raise DataError(f"{prefix} was tokenized with {meta.get('tokenizer')}, not with {who}'s tokenizer "
                        f"{tokenizer}: data and model must share one tokenizer")
