"""Tokenize a corpus into a Megatron-LM compatible OUT.bin/OUT.idx with megatron-core's IndexedDatasetBuilder.

    cherry-preprocess --input FILE --tokenizer-model PREFIX.model --output-prefix OUT
                      [--workers N] [--json-key text]

.jsonl: one document per line under --json-key; .txt: documents separated by blank lines. Both are read
through `datasets` (streaming, so memory stays flat), tokenized by a pool of workers in document order,
and each document ends with the tokenizer's EOD. Output appears atomically: nothing is left on error.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from cherry_megatron.errors import DataError, cli_errors

_sp = None


def _init_worker(model_path):
    global _sp
    import sentencepiece as spm
    _sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode(text):
    return _sp.encode(text) + [_sp.eos_id()] if text and text.strip() else None


def read_documents(path: str, json_key: str):
    """Documents from .jsonl or .txt through `datasets`, in file order."""
    from datasets import load_dataset
    from pyarrow import ArrowException

    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    if path.endswith((".jsonl", ".json")):
        ds = load_dataset("json", data_files=path, split="train", streaming=True)
        key = json_key
    else:
        ds = load_dataset("text", data_files=path, split="train", streaming=True, sample_by="paragraph")
        key = "text"
    # A .txt paragraph keeps the file's trailing newline on the last document only; strip it so every
    # document is encoded the same way. JSONL text is taken verbatim.
    strip = (lambda t: t.strip("\n")) if key == "text" and not path.endswith((".jsonl", ".json")) else (lambda t: t)
    try:
        for row in ds:
            if key not in row:
                raise DataError(f"{path}: a document has no key '{key}' (choose one with --json-key)")
            yield strip(row[key])
    except (ValueError, OSError, ArrowException) as e:
        # A malformed line is pyarrow's ArrowInvalid (a ValueError), a non-UTF-8 file a UnicodeDecodeError;
        # anything else is a bug and keeps its traceback.
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--json-key", default="text")
    p.add_argument("--chunk-size", type=int, default=32)
    args = p.parse_args(argv)
    with cli_errors():
        import numpy as np
        import sentencepiece as spm
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
        from tqdm import tqdm

        if not os.path.isfile(args.tokenizer_model):
            raise DataError(f"tokenizer model not found: {args.tokenizer_model}")
        vocab = spm.SentencePieceProcessor(model_file=args.tokenizer_model).get_piece_size()
        dtype = DType.optimal_dtype(vocab)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        tmp = f"{args.output_prefix}.tmp{os.getpid()}"
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        docs = tokens = 0
        start = time.perf_counter()
        try:
            with mp.get_context("fork").Pool(args.workers, _init_worker, (args.tokenizer_model,)) as pool:
                bar = tqdm(pool.imap(_encode, read_documents(args.input, args.json_key), args.chunk_size),
                           unit="doc", desc="tokenizing", disable=None)
                for ids in bar:
                    if ids is None:
                        continue
                    builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    docs += 1
                    tokens += len(ids)
            if docs == 0:
                raise DataError(f"{args.input} holds no non-empty documents")
            builder.finalize(tmp + ".idx")
            for ext in (".bin", ".idx"):
                os.replace(tmp + ext, args.output_prefix + ext)
        finally:
            for ext in (".bin", ".idx"):
                if os.path.exists(tmp + ext):
                    os.unlink(tmp + ext)
        secs = time.perf_counter() - start
        print(f"wrote {args.output_prefix}.bin/.idx: {docs} documents, {tokens} tokens, "
              f"{tokens / secs:,.0f} tokens/s ({secs:.1f} s, {args.workers} workers)")


if __name__ == "__main__":
    main()
