"""Early exit of a recurrent model: held-out loss and throughput at each exit depth, and greedy decoding
that stops unrolling a token once the head is confident.

    .venv/bin/python bench/recurrent_exit.py --load RUN_DIR_OR_CHECKPOINT [--threshold 0.5 0.3 ...] [--new-tokens 24]

Part 1, per exit depth (the model's recurrent.exit_depths and full depth): held-out loss over the first
--eval-tokens tokens and forward tokens/s on the same windows.
Part 2, decoding: greedy generation of --new-tokens tokens for --prompts prompts cut from the held-out
data. Each new token runs the positions up to the first exit depth, and goes on to the next depth only
while the head's top probability is below --threshold. No KV cache (every step re-reads the prefix at
the depth it runs, so skipped positions never leave stale caches) and no depth-wise batching: the
saving measured is the compute of the positions not run. Baseline: the same decoding at full depth.
Last line JSON; per threshold `ratio_decode_tokens_per_s` > 1 means early exit is faster. CPU figures.
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
def decode(model, prompts: torch.Tensor, new_tokens: int, depths: list[int], threshold: float):
    """(generated tokens [b, new], mean depth used per token)."""
    seq, used = prompts, []
    for _ in range(new_tokens):
        x, start = model.embed(seq), 0
        for d in depths:
            x = model.unroll(x, model.context(x), start, d)
            start = d
            probs = torch.softmax(model.logits(model.final_norm(x[:, -1:])).float(), dim=-1)
            top, token = probs.max(dim=-1)
            if d == depths[-1] or bool((top >= threshold).all()):
                break
        used.append(d)
        seq = torch.cat([seq, token], dim=1)
    return seq[:, prompts.shape[1]:], statistics.mean(used)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--data", default="", help="held-out prefix; default: the run's data.eval_path")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threshold", type=float, nargs="+", default=[0.5, 0.3, 0.15])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args()
    with cli_errors():
        from cherry_megatron import distributed
        from cherry_megatron.config import ConfigError, ParallelConfig
        from cherry_megatron.convert.load import load_model
        from cherry_megatron.data.indexed import token_stream
        from cherry_megatron.evaluate import window_loss

        distributed.set_threads(0)
        distributed.init(ParallelConfig())
        model, cfg = load_model(args.load)
        if not cfg.recurrent.num_blocks:
            raise ConfigError(f"{args.load} is a dense model; early exit needs a recurrent one")
        depths = sorted(set(cfg.recurrent.exit_depths) | {cfg.model.num_layers})
        stream = token_stream(args.data or cfg.data.eval_path)
        res = {"load": args.load, "depths": depths, "device": "cpu"}
        for d in depths:
            t0 = time.perf_counter()
            loss, n = window_loss(lambda x, y: model(x, y, depth=d), stream, cfg.train.seq_length, args.eval_tokens,
                                  8, torch.device("cpu"))
            tps = n / (time.perf_counter() - t0)
            res[f"depth{d}_loss"], res[f"depth{d}_forward_tokens_per_s"] = round(loss, 4), round(tps, 1)
            print(f"depth {d:>3}: held-out loss {loss:.4f}, forward {tps:,.0f} tokens/s", flush=True)
        starts = range(0, args.prompts * 997, 997)
        prompts = torch.stack([torch.from_numpy(stream[s:s + args.prompt_length].astype("int64")) for s in starts])
        def timed(ds, thr):  # one prompt at a time, so every token exits on its own confidence
            t0, outs, used = time.perf_counter(), [], []
            for prompt in prompts:
                out, d = decode(model, prompt[None], args.new_tokens, ds, thr)
                outs.append(out)
                used.append(d)
            out = torch.cat(outs)
            return out, out.numel() / (time.perf_counter() - t0), statistics.mean(used)

        full, full_tps, _ = timed(depths[-1:], 1.0)
        print(f"decode full depth: {full_tps:,.1f} tokens/s", flush=True)
        res["decode_full_tokens_per_s"] = round(full_tps, 2)
        for thr in args.threshold:
            out, tps, mean_depth = timed(depths, thr)
            agree = float((out == full).float().mean())
            print(f"decode exit at p>={thr}: {tps:,.1f} tokens/s ({tps / full_tps:.2f}x), mean depth {mean_depth:.1f}, "
                  f"same tokens as full depth {agree:.0%}", flush=True)
            res[f"threshold{thr}"] = {"tokens_per_s": round(tps, 2), "mean_depth": round(mean_depth, 2),
                                      "token_agreement": round(agree, 3),
                                      "ratio_decode_tokens_per_s": round(tps / full_tps, 3)}
        distributed.shutdown()
        print(json.dumps(res))


if __name__ == "__main__":
    main()
