"""Tokenize a corpus into a Megatron-LM compatible OUT.bin/OUT.idx with megatron-core's IndexedDatasetBuilder.

    cherry-preprocess --input FILE --tokenizer-model PREFIX.model|HF_DIR --output-prefix OUT
                      [--workers N] [--json-key text] [--where KEY=V1,V2]

.jsonl: one document per line under --json-key; .txt: documents separated by blank lines. Both are read
through `datasets` (streaming, so memory stays flat), tokenized by a pool of workers in document order,
and each document ends with the tokenizer's EOD. The tokenizer is a sentencepiece .model or a Hugging Face
tokenizer (data/tokenizer.py); OUT.meta.json records which (its sha256), so a model trained or evaluated on
the data can be checked against it. `--where lang=en,code` keeps the JSONL documents whose KEY is one of the
values. Output appears atomically: nothing is left on error.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from cherry_megatron.errors import DataError, cli_errors

# Set in the parent before the fork: the workers inherit the loaded tokenizer (a Hugging Face one costs
# seconds to load, as transformers is imported).
_encode_text = None
_eod = None


def _encode(text):
    return _encode_text(text) + [_eod] if text and text.strip() else None


def parse_where(where: str | None):
    """`KEY=V1,V2` -> (key, {values}); None keeps every document."""
    if not where:
        return None
    key, sep, values = where.partition("=")
    if not sep or not key or not values:
        raise DataError(f"--where expects KEY=VALUE[,VALUE...], got {where!r}")
    return key, set(values.split(","))


def read_documents(path: str, json_key: str, where=None):
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
            if where is not None:
                if where[0] not in row:
                    raise DataError(f"{path}: a document has no key '{where[0]}' (--where)")
                if str(row[where[0]]) not in where[1]:
                    continue
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
    p.add_argument("--where", default=None, help="KEY=V1,V2: only JSONL documents whose KEY is one of the values")
    args = p.parse_args(argv)
    with cli_errors():
        import numpy as np
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
        from tqdm import tqdm

        from cherry_megatron.data.indexed import write_meta
        from cherry_megatron.data.tokenizer import load_tokenizer

        where = parse_where(args.where)
        global _encode_text, _eod
        tok = load_tokenizer(args.tokenizer_model)
        _encode_text, _eod = tok.tokenize, tok.eod
        vocab = tok.vocab_size
        dtype = DType.optimal_dtype(vocab)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        tmp = f"{args.output_prefix}.tmp{os.getpid()}"
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        docs = tokens = 0
        start = time.perf_counter()
        try:
            with mp.get_context("fork").Pool(args.workers) as pool:
                bar = tqdm(pool.imap(_encode, read_documents(args.input, args.json_key, where),
                                         args.chunk_size),
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
            write_meta(tmp, args.tokenizer_model, vocab, tok.eod)
            # The meta first: a reader that finds the new .bin/.idx finds the tokenizer they were made with.
            for ext in (".meta.json", ".bin", ".idx"):
                os.replace(tmp + ext, args.output_prefix + ext)
        finally:
            for ext in (".meta.json", ".bin", ".idx"):
                if os.path.exists(tmp + ext):
                    os.unlink(tmp + ext)
        secs = time.perf_counter() - start
        print(f"wrote {args.output_prefix}.bin/.idx: {docs} documents, {tokens} tokens, "
              f"{tokens / secs:,.0f} tokens/s ({secs:.1f} s, {args.workers} workers)")


if __name__ == "__main__":
    main()
