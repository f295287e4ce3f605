"""Generate text from any checkpoint with KV caches: greedy or sampled, one JSON line per prompt.

    python -m cherry_megatron.generate --load CKPT_OR_HF_DIR (--prompt TEXT ... | --prompt-file FILE)
        [--max-new-tokens N] [--greedy | --temperature T --top-p P --seed S] [--prefill-chunk C]
        [--speculative-exit D --draft-tokens K] [--precision train|fp32|bf16]

CKPT is a run dir, checkpoint, converted or Hugging Face dir; the tokenizer is the checkpoint's
(data.tokenizer_model: sentencepiece or Hugging Face). Under torchrun the world is one TP group (every rank
holds its slice of every layer; rank 0 prints). stdout: `{"prompt", "tokens": [new ids], "text"}` per prompt;
generation ends after N tokens or at the tokenizer's end-of-document token (kept in `tokens`).
`--speculative-exit D` decodes greedily by self-speculation (generate/speculative.py): the first D layer units
(loop positions of a recurrent model) draft K tokens, the rest verify them; the tokens are the greedy ones, and
each line also carries `"speculative": {"acceptance", "tokens_per_round", "rounds"}`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from cherry_megatron.errors import ConfigError, cli_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    src.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax (the default unless --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-chunk", type=int, default=0, help="prefill the prompt in chunks of C tokens (0: one pass)")
    p.add_argument("--speculative-exit", type=int, default=0, help="draft with the first D layer units (0: off)")
    p.add_argument("--draft-tokens", type=int, default=4, help="K tokens drafted per verification")
    p.add_argument("--precision", default="train", choices=["train", "fp32", "bf16"])
    return p.parse_args(argv)


def prompts_of(args) -> list[str]:
    if args.prompt is not None:
        texts = args.prompt
    else:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f]
        except OSError as e:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    if not texts or any(not t.strip() for t in texts):
        raise ConfigError("a prompt is empty (--prompt-file: one non-empty prompt per line)")
    return texts


def check(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.greedy and args.temperature:
        raise ConfigError("--greedy and --temperature > 0 contradict each other")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.prefill_chunk < 0:
        raise ConfigError("--prefill-chunk must be >= 0")
    if args.speculative_exit:
        if args.temperature:
            raise ConfigError("--speculative-exit decodes greedily; it does not take --temperature")
        if args.draft_tokens < 1:
            raise ConfigError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    elif args.speculative_exit < 0:
        raise ConfigError(f"--speculative-exit must be >= 1, got {args.speculative_exit}")


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli_errors():
        check(args)
        texts = prompts_of(args)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time messages go to stdout
            results = _generate(args, texts)
        for r in results:
            print(json.dumps(r, ensure_ascii=False), flush=True)


def _generate(args, texts: list[str]) -> list[dict]:
    import torch

    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig, routing
    from cherry_megatron.convert.load import load_model
    from cherry_megatron.data.tokenizer import load_tokenizer
    from cherry_megatron.engine import compute_dtype
    from cherry_megatron.errors import CheckpointError
    from cherry_megatron.generate.decode import generate
    from cherry_megatron.generate.sampling import Sampler
    from cherry_megatron.generate.speculative import SpeculativeStats, speculative_generate

    distributed.set_threads(0)
    layout = distributed.init(ParallelConfig(tp=distributed.world_size_from_env()))
    try:
        model, cfg = load_model(args.load)
        if not cfg.data.tokenizer_model:
            raise CheckpointError(f"{args.load} names no tokenizer (data.tokenizer_model)")
        tok = load_tokenizer(cfg.data.tokenizer_model)
        if tok.vocab_size > cfg.model.vocab_size:
            raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens, the model {cfg.model.vocab_size}")
        routed = routing(cfg)
        if routed is not None and routed.capacity_factor > 0:
            raise CheckpointError(f"{args.load} routes with capacity_factor={routed.capacity_factor}: which tokens "
                                  "an expert drops depends on the other tokens of the pass, so cached decoding would "
                                  "differ from the model; generation needs dropless routing (capacity_factor 0)")
        dtype = compute_dtype(cfg.train.precision if args.precision == "train" else args.precision, layout.device)
        model = model.to(device=layout.device, dtype=dtype)
        depth = len(model.units())
        if args.speculative_exit and not 1 <= args.speculative_exit < depth:
            raise ConfigError(f"--speculative-exit {args.speculative_exit}: the model has {depth} layer units, so the "
                              f"exit must lie in 1..{depth - 1}")
        out = []
        for text in texts:
            ids = list(tok.tokenize(text))
            sampler = Sampler(args.temperature, args.top_p, args.seed)
            stats = SpeculativeStats()
            with torch.no_grad():
                if args.speculative_exit:
                    new = speculative_generate(model, ids, args.max_new_tokens, tok.vocab_size, args.speculative_exit,
                                               args.draft_tokens, tok.eod, args.prefill_chunk, stats)
                else:
                    new = generate(model, ids, args.max_new_tokens, tok.vocab_size, sampler, tok.eod, args.prefill_chunk)
            out.append({"prompt": text, "tokens": new, "text": tok.detokenize(new)})
            if args.speculative_exit:
                out[-1]["speculative"] = {"acceptance": round(stats.acceptance, 4), "rounds": stats.rounds,
                                          "tokens_per_round": round(stats.tokens_per_round, 3)}
    finally:
        distributed.shutdown()
    return out if layout.rank == 0 else []


if __name__ == "__main__":
    main()
