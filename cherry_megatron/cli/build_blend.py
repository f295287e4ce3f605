"""Per-language weights of a training blend by a stated rule (cherry_megatron/data/blend.py).

    cherry-build-blend (--inputs LANG=PREFIX ... | --counts LANG=TOKENS ...) --method unimax|temperature|natural
        [--budget TOKENS] [--max-epochs N] [--temperature T] [--output BLEND.yaml]

Prints a table (tokens, weight, allocated tokens, epochs per language) and, last, one JSON line
{"weights": {lang: w}, "tokens": {lang: allocated}, "epochs": {lang: e}}. --budget is the run's training tokens
(default: every token once). --output (with --inputs) writes the blend file the trainer reads as
`data.blend_file`.
"""
from __future__ import annotations

import argparse
import json
import sys

from cherry_megatron.errors import ConfigError, cli_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", metavar="LANG=PREFIX", help="each language's .bin/.idx prefix")
    src.add_argument("--counts", nargs="+", metavar="LANG=TOKENS", help="each language's token count")
    p.add_argument("--method", required=True, help="unimax, temperature or natural")
    p.add_argument("--budget", type=float, default=0, help="training tokens to allocate; 0: every token once")
    p.add_argument("--max-epochs", type=float, default=1.0, help="UniMax's cap: epochs of one language's data")
    p.add_argument("--temperature", type=float, default=3.33, help="temperature sampling's T")
    p.add_argument("--output", default="", help="the blend file (needs --inputs)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with cli_errors():
        from cherry_megatron.data.blend import allocate, lang_pairs, token_count, write_blend

        if args.output and not args.inputs:
            raise ConfigError("--output needs --inputs (a blend file names each language's data)")
        if args.inputs:
            prefixes = lang_pairs(args.inputs, "PREFIX", "--inputs")
            counts = {lang: token_count(prefix) for lang, prefix in prefixes.items()}
        else:
            prefixes = {}
            try:
                counts = {lang: int(float(v)) for lang, v in lang_pairs(args.counts, "TOKENS", "--counts").items()}
            except (ValueError, OverflowError) as e:
                raise ConfigError(f"--counts: {e}") from None
        blend = allocate(counts, args.method, args.budget, args.max_epochs, args.temperature)
        budget = sum(blend.tokens.values())
        print(f"{args.method} over {len(counts)} languages, {sum(counts.values()):,} tokens, budget {budget:,.0f}"
              + (f", at most {args.max_epochs:g} epochs" if args.method == "unimax" else "")
              + (f", T={args.temperature:g}" if args.method == "temperature" else ""), file=sys.stderr)
        print(f"{'lang':<12} {'tokens':>14} {'natural':>8} {'weight':>8} {'allocated':>14} {'epochs':>8}", file=sys.stderr)
        total = sum(counts.values())
        for lang in sorted(counts, key=counts.get, reverse=True):
            print(f"{lang:<12} {counts[lang]:>14,} {counts[lang] / total:>8.4f} {blend.weights[lang]:>8.4f} "
                  f"{blend.tokens[lang]:>14,.0f} {blend.epochs[lang]:>8.3f}", file=sys.stderr)
        if args.output:
            settings = {"method": args.method, "budget": round(budget), "max_epochs": args.max_epochs,
                        "temperature": args.temperature}
            write_blend(args.output, blend, prefixes, settings)
            print(f"wrote {args.output}", file=sys.stderr)
        result = {"weights": blend.weights, "tokens": {k: round(v) for k, v in blend.tokens.items()},
                  "epochs": blend.epochs}
        print(json.dumps(result), flush=True)
        return result


if __name__ == "__main__":
    main()
