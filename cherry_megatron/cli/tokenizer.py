"""Train a sentencepiece BPE tokenizer with byte fallback, so Korean and any Unicode round-trip.

    cherry-train-tokenizer --input FILE [FILE ...] --vocab-size N --model-prefix PREFIX

Inputs are .jsonl (key --json-key, default text) or plain text. Ids 0-3 are unk, bos, eos (= EOD) and pad,
as megatron-core's GPTDataset expects distinct EOD and pad ids.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from cherry_megatron.errors import DataError, cli_errors


def iter_texts(paths, json_key):
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        with open(path, encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[json_key]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{path}:{n}: not a JSON object with key '{json_key}'") from None
            else:
                yield f.read()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    with cli_errors():
        import sentencepiece as spm

        out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
        os.makedirs(out_dir, exist_ok=True)
        # sentencepiece trains on lines; write the documents' lines to one temp file it can sample from.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False, dir=out_dir) as tmp:
            for text in iter_texts(args.input, args.json_key):
                for line in text.splitlines():
                    if line.strip():
                        tmp.write(line + "\n")
        tmp_prefix = args.model_prefix + ".tmp"
        try:
            spm.SentencePieceTrainer.train(
                input=tmp.name, model_prefix=tmp_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
                byte_fallback=True, character_coverage=args.character_coverage, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=args.max_sentences,
                shuffle_input_sentence=True, num_threads=args.threads, max_sentence_length=16384, minloglevel=2)
        except RuntimeError as e:
            raise DataError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
        finally:
            os.unlink(tmp.name)
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, args.model_prefix + ext)
        sp = spm.SentencePieceProcessor(model_file=args.model_prefix + ".model")
        sample = "대한민국 연구개발 규정. Hello, world! 123"
        assert sp.decode(sp.encode(sample)) == sample, "tokenizer does not round-trip"
        print(f"wrote {args.model_prefix}.model (vocab {sp.get_piece_size()}, eod id {sp.eos_id()}, pad id {sp.pad_id()})")


if __name__ == "__main__":
    main()
