"""Characters per token of each language (fertility) for any tokenizer: a vocabulary that fails a language shows.

    cherry-tokenizer-report --tokenizer MODEL [MODEL ...] --input FILE.jsonl [FILE ...] [--lang-key lang]
        [--json-key text] [--max-chars N]

MODEL is a sentencepiece .model or a Hugging Face tokenizer directory (data/tokenizer.py). Per language (the
JSONL key --lang-key), up to --max-chars characters of its documents in file order are tokenized (no EOD). Prints
a table per tokenizer, then one JSON line per tokenizer:
{"tokenizer": MODEL, "languages": {lang: {"chars", "tokens", "chars_per_token"}}}.
"""
from __future__ import annotations

import argparse
import json
import sys

from cherry_megatron.errors import DataError, cli_errors


def fertility(tokenize, texts_by_lang: dict) -> dict:
    out = {}
    for lang, texts in texts_by_lang.items():
        chars = sum(map(len, texts))
        tokens = sum(len(tokenize(t)) for t in texts)
        out[lang] = {"chars": chars, "tokens": tokens, "chars_per_token": chars / tokens if tokens else 0.0}
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", nargs="+", required=True)
    p.add_argument("--input", nargs="+", required=True, help="JSONL documents with a language key")
    p.add_argument("--lang-key", default="lang")
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-chars", type=int, default=200_000, help="characters per language at most; 0: all")
    args = p.parse_args(argv)
    with cli_errors():
        from cherry_megatron.cli.tokenizer import iter_texts
        from cherry_megatron.data.tokenizer import load_tokenizer

        texts, have = {}, {}
        for text, lang in iter_texts(args.input, args.json_key, args.lang_key):
            texts.setdefault(lang, [])
            if not args.max_chars or have.get(lang, 0) < args.max_chars:
                texts[lang].append(text if not args.max_chars else text[:args.max_chars - have.get(lang, 0)])
                have[lang] = have.get(lang, 0) + len(texts[lang][-1])
        if not texts:
            raise DataError(f"{', '.join(args.input)} hold no documents")
        results = []
        for model in args.tokenizer:
            tok = load_tokenizer(model)
            per = fertility(tok.tokenize, texts)
            print(f"{model} (vocabulary {tok.vocab_size:,})", file=sys.stderr)
            print(f"  {'lang':<8} {'chars':>10} {'tokens':>10} {'chars/token':>12}", file=sys.stderr)
            for lang, r in sorted(per.items(), key=lambda kv: -kv[1]["chars_per_token"]):
                print(f"  {lang:<8} {r['chars']:>10,} {r['tokens']:>10,} {r['chars_per_token']:>12.3f}", file=sys.stderr)
            results.append({"tokenizer": model, "languages": per})
        for r in results:
            print(json.dumps(r, ensure_ascii=False), flush=True)
        return results


if __name__ == "__main__":
    main()
