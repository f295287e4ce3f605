"""Train a sentencepiece BPE tokenizer with byte fallback, so Korean and any Unicode round-trip.

    cherry-train-tokenizer --input FILE [FILE ...] --vocab-size N --model-prefix PREFIX
        [--balance unimax|temperature|natural [--lang-key lang] [--budget-chars N] [--max-epochs N] [--temperature T]]

Inputs are .jsonl (key --json-key, default text) or plain text. Ids 0-3 are unk, bos, eos (= EOD) and pad,
as megatron-core's GPTDataset expects distinct EOD and pad ids. --balance samples the training lines per
language (the JSONL key --lang-key) by a blend rule of data/blend.py over characters, --budget-chars in all
(default: all the text once, where UniMax at 1 epoch is the natural mix): under UniMax at 1 epoch and a smaller
budget, the small languages are taken whole and the large ones share the rest equally, so the vocabulary does
not spend itself on the largest language (each language's sampled characters are printed; lines in a fixed
hash order, repeated past one epoch).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

from cherry_megatron.errors import DataError, cli_errors


def iter_texts(paths, json_key, lang_key=None):
    """Texts of the inputs ((text, language) pairs with `lang_key`)."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        with open(path, encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        keys = (json_key, lang_key) if lang_key else (json_key,)
                        try:
                            row = json.loads(line)
                            values = tuple(str(row[k]) if k == lang_key else row[k] for k in keys)
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{path}:{n}: not a JSON object with key(s) {', '.join(keys)}") from None
                        yield values if lang_key else values[0]
            elif lang_key:
                raise DataError(f"{path}: --balance needs JSONL inputs with a '{lang_key}' key")
            else:
                yield f.read()


def balanced_lines(args) -> list[str]:
    """The training lines of every language, in the amounts --balance's rule gives over characters."""
    from cherry_megatron.data.blend import allocate

    lines = {}
    for text, lang in iter_texts(args.input, args.json_key, args.lang_key):
        lines.setdefault(lang, []).extend(line for line in text.splitlines() if line.strip())
    counts = {lang: sum(map(len, ls)) for lang, ls in lines.items()}
    blend = allocate(counts, args.balance, args.budget_chars, args.max_epochs, args.temperature)
    out = []
    for lang, ls in lines.items():
        ls.sort(key=lambda line: hashlib.sha256(line.encode()).digest())
        want, taken, i = blend.tokens[lang], 0, 0
        while taken < want:
            out.append(ls[i % len(ls)])
            taken += len(out[-1])
            i += 1
        print(f"  {lang}: {counts[lang]:,} characters, {taken:,} sampled ({taken / counts[lang]:.2f} epochs)",
              file=sys.stderr)
    return out


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
    p.add_argument("--balance", default="", help="unimax, temperature or natural: lines per language by this rule")
    p.add_argument("--lang-key", default="lang", help="--balance: the JSONL key naming each document's language")
    p.add_argument("--budget-chars", type=float, default=0, help="--balance: characters to sample; 0: all once")
    p.add_argument("--max-epochs", type=float, default=1.0, help="--balance unimax: epochs of a language at most")
    p.add_argument("--temperature", type=float, default=3.33, help="--balance temperature: T")
    args = p.parse_args(argv)
    with cli_errors():
        import sentencepiece as spm

        out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
        # A balanced sample needs every line first (its sizes decide the amounts); otherwise lines stream.
        chosen = balanced_lines(args) if args.balance else (
            line for text in iter_texts(args.input, args.json_key) for line in text.splitlines() if line.strip())
        made_dir = not os.path.isdir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        # sentencepiece trains on lines; write the documents' lines to one temp file it can sample from.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False, dir=out_dir) as tmp:
            try:
                for line in chosen:
                    tmp.write(line + "\n")
            except BaseException:  # a bad input found while streaming leaves nothing behind
                os.unlink(tmp.name)
                if made_dir:
                    os.rmdir(out_dir)
                raise
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
