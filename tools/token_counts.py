"""Unigram token counts of one or more Megatron .bin/.idx datasets, for SGT's frequency and payload policies.

    python tools/token_counts.py --data PREFIX [PREFIX ...] (--vocab-size N | --tokenizer-model TOK) --output COUNTS.npy

TOK (a sentencepiece .model or a Hugging Face tokenizer directory) gives the vocabulary size and is checked
against the tokenizer each data file was made with.

The trainer counts small corpora itself at start-up; for large ones compute the counts once here and
point `sgt.counts` at the file. Written atomically as a plain int64 .npy (loaded without pickle).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cherry_megatron.errors import cli_errors  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, default=0)
    p.add_argument("--tokenizer-model", default="")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    with cli_errors():
        from cherry_megatron.errors import ConfigError
        from cherry_megatron.sgt import unigram_counts

        vocab = args.vocab_size
        if args.tokenizer_model:
            from cherry_megatron.data.indexed import check_tokenizer
            from cherry_megatron.data.tokenizer import load_tokenizer

            vocab = vocab or load_tokenizer(args.tokenizer_model).vocab_size
            for prefix in args.data:
                check_tokenizer(prefix, args.tokenizer_model, "--tokenizer-model")
        if vocab <= 0:
            raise ConfigError("give --vocab-size N or --tokenizer-model TOK")
        counts = unigram_counts(args.data, vocab)
        tmp = f"{args.output}.tmp.npy"
        np.save(tmp, counts.astype(np.int64))
        os.replace(tmp, args.output)
        print(f"wrote {args.output}: {int(counts.sum()):,} tokens, {int((counts > 0).sum()):,} distinct ids")


if __name__ == "__main__":
    main()
