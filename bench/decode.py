"""Decoding speed: KV caching, and self-speculative decoding against cached full-depth greedy decoding.

    .venv/bin/python bench/decode.py --load CKPT_OR_HF_DIR [--data PREFIX] [--prompts 4] [--prompt-length 64]
        [--new-tokens 64] [--repeats 5] [--spec D:K ...] [--threads 2]

Batch 1, greedy, in this one process after a warm-up run, fixed torch threads; every figure is the median of
--repeats runs over the same prompts (windows of the held-out data, default the checkpoint's data.eval_path).
  caching      cached decoding (generate/decode.py) against re-running the whole prefix per token at full
               depth without a cache (what bench/recurrent_exit.py did): ratio_caching.
  speculative  per D:K (exit after D layer units, K drafted tokens): tokens/s against cached full depth
               (ratio_speculative), acceptance of drafted tokens, tokens emitted per verification round,
               layer-unit applications per emitted token (full depth: the model's depth), and the share of
               output tokens equal to full-depth greedy (1.0: exact, as it must be).
  depthwise    recurrent models: continuous depth-wise batching (generate/depthwise.py) of --requests prompts
               through --rows rows, exits at the model's recurrent.exit_depths (or thirds of the depth) by
               confidence --threshold, against sequence-wise continuous batching at full depth (same rows,
               cache, kernels): tokens/s (ratio_depthwise), mean exit depth, exit histogram, agreement with
               the full-depth tokens, and the held-out loss of the exits the rule chose (teacher-forced over
               the windows' next --new-tokens tokens, copy-state KV) against full depth's.
Last line JSON with the `ratio_*` fields. CPU figures on this machine; a GPU's balance of memory reads and
compute differs, and so would the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cherry_megatron.errors import cli_errors  # noqa: E402


@torch.no_grad()
def uncached(model, prompt: list[int], new_tokens: int, vocab: int) -> list[int]:
    from cherry_megatron.generate.cache import full_logits

    seq = list(prompt)
    for _ in range(new_tokens):
        x = model.embed(torch.tensor([seq]))
        seq.append(int(full_logits(model, model.unroll(x, model.context(x)), vocab)[0, -1].argmax()))
    return seq[len(prompt):]


def timed(fn, prompts, repeats: int):
    """(outputs of the last run, median tokens/s over `repeats` runs after one warm-up run)."""
    fn(prompts[0][:8])
    rates = []
    for _ in range(repeats):
        t0, outs = time.perf_counter(), [fn(p) for p in prompts]
        rates.append(sum(map(len, outs)) / (time.perf_counter() - t0))
    return outs, statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--data", default="")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--spec", nargs="+", default=[], help="D:K pairs; default: D = depth/4 and depth/2, K = 2 and 4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-uncached", action="store_true")
    p.add_argument("--rows", type=int, default=16, help="depth-wise batching: rows in flight")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--threshold", type=float, nargs="+", default=[0.8, 0.5])
    args = p.parse_args()
    with cli_errors():
        from cherry_megatron import distributed
        from cherry_megatron.config import ParallelConfig
        from cherry_megatron.convert.load import load_model
        from cherry_megatron.data.indexed import token_stream
        from cherry_megatron.data.tokenizer import load_tokenizer
        from cherry_megatron.generate.decode import generate
        from cherry_megatron.generate.sampling import Sampler
        from cherry_megatron.generate.speculative import SpeculativeStats, speculative_generate

        torch.set_num_threads(args.threads)
        distributed.init(ParallelConfig())
        model, cfg = load_model(args.load)
        vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size if cfg.data.tokenizer_model else cfg.model.vocab_size
        stream = token_stream(args.data or cfg.data.eval_path)
        prompts = [stream[s:s + args.prompt_length].astype("int64").tolist()
                   for s in range(0, args.prompts * 997, 997)]
        depth = len(model.units())
        res = {"load": args.load, "depth": depth, "threads": args.threads, "new_tokens": args.new_tokens,
               "prompt_length": args.prompt_length, "prompts": args.prompts, "device": "cpu"}
        n = args.new_tokens
        full, full_tps = timed(lambda pr: generate(model, pr, n, vocab, Sampler()), prompts, args.repeats)
        res["cached_tokens_per_s"] = round(full_tps, 2)
        print(f"cached full depth: {full_tps:,.1f} tokens/s", flush=True)
        if not args.skip_uncached:
            out, tps = timed(lambda pr: uncached(model, pr, n, vocab), prompts, args.repeats)
            res.update(uncached_tokens_per_s=round(tps, 2), ratio_caching=round(full_tps / tps, 3),
                       uncached_agreement=_agreement(out, full))
            print(f"uncached full depth: {tps:,.1f} tokens/s; caching {full_tps / tps:.2f}x", flush=True)
        specs = args.spec or [f"{d}:{k}" for d in sorted({max(1, depth // 4), depth // 2}) for k in (2, 4)]
        for spec in specs:
            d, k = map(int, spec.split(":"))
            stats = SpeculativeStats()

            def run(pr, d=d, k=k, stats=stats):
                return speculative_generate(model, pr, n, vocab, d, k, stats=stats)

            out, tps = timed(run, prompts, args.repeats)
            row = {"tokens_per_s": round(tps, 2), "ratio_speculative": round(tps / full_tps, 3),
                   "acceptance": round(stats.acceptance, 4), "tokens_per_round": round(stats.tokens_per_round, 3),
                   "unit_passes_per_token": round(stats.unit_tokens / max(1, stats.emitted), 2),
                   "agreement": _agreement(out, full)}
            res[f"spec_d{d}_k{k}"] = row
            print(f"speculative D={d} K={k}: {tps:,.1f} tokens/s ({row['ratio_speculative']:.2f}x), acceptance "
                  f"{row['acceptance']:.2f}, {row['tokens_per_round']:.2f} tokens/round, "
                  f"{row['unit_passes_per_token']:.1f} unit passes/token (full: {depth}), "
                  f"same tokens {row['agreement']:.0%}", flush=True)
        best = max((v for k_, v in res.items() if k_.startswith("spec_")), key=lambda v: v["ratio_speculative"])
        res["ratio_speculative_best"] = best["ratio_speculative"]
        if cfg.recurrent.num_blocks and not cfg.moee.num_experts:
            res["depthwise"] = depthwise(model, cfg, stream, vocab, args)
        distributed.shutdown()
        print(json.dumps(res))


def depthwise(model, cfg, stream, vocab: int, args) -> dict:
    from cherry_megatron.generate.depthwise import DepthwiseBatcher

    depth, n, plen = len(model.units()), args.new_tokens, args.prompt_length
    exits = cfg.recurrent.exit_depths or [depth // 3, 2 * depth // 3]
    starts = range(0, args.requests * 499, 499)
    windows = [stream[s:s + plen + n].astype("int64").tolist() for s in starts]
    prompts, forced = [w[:plen] for w in windows], [w[plen:] for w in windows]
    max_len = plen + n + 1

    def measure(schedule, threshold):
        rates = []
        for _ in range(max(1, args.repeats // 2)):  # each run is requests x new tokens; fewer repeats
            b = DepthwiseBatcher(model, args.rows, max_len, vocab, exits, threshold, schedule)
            t0 = time.perf_counter()
            done = b.run(prompts, n)
            rates.append(sum(len(r.tokens) for r in done) / (time.perf_counter() - t0))
        tf = DepthwiseBatcher(model, args.rows, max_len, vocab, exits, threshold, schedule)
        loss = statistics.mean(x for r in tf.run(prompts, n, forced) for x in r.nll)
        return [r.tokens for r in done], statistics.median(rates), b.stats, loss

    base, base_tps, _, base_loss = measure("sequence", None)
    out = {"rows": args.rows, "requests": args.requests, "exit_depths": exits,
           "sequence_tokens_per_s": round(base_tps, 2), "full_depth_heldout_loss": round(base_loss, 4)}
    print(f"sequence-wise batching, {args.rows} rows: {base_tps:,.1f} tokens/s, held-out loss {base_loss:.4f}",
          flush=True)
    for threshold in [None, *args.threshold]:
        toks, tps, stats, loss = measure("depthwise", threshold)
        name = "no_exit" if threshold is None else f"threshold{threshold}"
        out[name] = {"tokens_per_s": round(tps, 2), "ratio_depthwise": round(tps / base_tps, 3),
                     "mean_depth": round(stats.mean_depth, 2), "exits": dict(sorted(stats.exits.items())),
                     "rows_per_tick": round(stats.unit_rows / max(1, stats.ticks), 2),
                     "agreement": _agreement(toks, base), "heldout_loss": round(loss, 4)}
        print(f"depth-wise {name}: {tps:,.1f} tokens/s ({tps / base_tps:.2f}x), mean depth {stats.mean_depth:.1f} "
              f"of {depth}, exits {dict(sorted(stats.exits.items()))}, same tokens {out[name]['agreement']:.0%}, "
              f"held-out loss {loss:.4f}", flush=True)
    return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 4)


if __name__ == "__main__":
    main()
