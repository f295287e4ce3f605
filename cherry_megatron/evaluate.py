"""Held-out loss and perplexity of a checkpoint, by a rule any other tool can reproduce.

    python -m cherry_megatron.evaluate --load RUN_DIR_OR_CHECKPOINT [...] --data PREFIX [--seq-length S] [--max-tokens N]
    python -m cherry_megatron.evaluate --load ... --data LANG=PREFIX [LANG=PREFIX ...] [...]

One JSON line per model given, in order: {"loss", "ppl", "tokens"} (and "load" when more than one is given:
several models in one process, as the recipe's evaluate stage does, pay the libraries' start-up once). With
LANG=PREFIX data, each file is evaluated alone (--max-tokens applies to each) and the line is
{"languages": {lang: {"loss", "tokens"}}, "loss": the token-weighted mean, "ppl", "tokens"}.

The data file's token stream in stored order (documents concatenated as written, EOD included) is cut
into windows tokens[k*S : k*S+S+1]: the first S are the input, the last S the targets. Windows are
taken for k = 0, 1, ... until N tokens are predicted (the last window is shortened to land on N
exactly). Nothing is shuffled or masked; `loss` is the mean over all predicted tokens. The model computes in the
run's training precision (`train.precision` on this device: bf16 on a GPU for `auto`), as the trainer's own
evaluation did; `--precision fp32` measures the fp32 master weights instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from cherry_megatron.errors import cli_errors


def windows(n_tokens: int, seq_length: int, max_tokens: int) -> list[tuple[int, int]]:
    """(start, number of predicted tokens) of each window."""
    total = n_tokens - 1 if max_tokens <= 0 else min(max_tokens, n_tokens - 1)
    return [(k, min(seq_length, total - k)) for k in range(0, total, seq_length)]


@torch.no_grad()
def window_loss(forward, stream: np.ndarray, seq_length: int, max_tokens: int, batch_size: int,
                device: torch.device, dp_rank: int = 0, dp: int = 1, group=None) -> tuple[float, int]:
    """(mean loss, tokens predicted); `forward(tokens, labels)` is a model (its `Output.per_token` is read).

    Windows are dealt round-robin over data-parallel ranks and the sums all-reduced.
    """
    mine = windows(len(stream), seq_length, max_tokens)[dp_rank::dp]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for length in sorted({n for _, n in mine}, reverse=True):
        starts = [s for s, n in mine if n == length]
        for i in range(0, len(starts), batch_size):
            chunk = np.stack([np.asarray(stream[s:s + length + 1], dtype=np.int64) for s in starts[i:i + batch_size]])
            x = torch.from_numpy(chunk).to(device)
            losses = forward(x[:, :-1], x[:, 1:]).per_token
            total[0] += losses.double().sum()
            total[1] += losses.numel()
    if dp > 1:
        dist.all_reduce(total, group=group)
    return (total[0] / total[1]).item(), int(total[1].item())


def heldout_losses(models: list, data: str, max_tokens: int, seq_length: int = 0) -> list[float]:
    """Held-out loss on `data` (CPU, one process, fp32) of each (Config, full state dict) in `models`: what the
    compression and pruning tools print for the model before and after."""
    from cherry_megatron import distributed
    from cherry_megatron.checkpoint.consolidate import build_loaded
    from cherry_megatron.config import ParallelConfig
    from cherry_megatron.data.indexed import token_stream

    stream = token_stream(data)
    distributed.set_threads(0)
    distributed.init(ParallelConfig())
    try:
        return [window_loss(build_loaded(cfg, state, "the model"), stream, seq_length or cfg.train.seq_length,
                            max_tokens, 8, torch.device("cpu"))[0] for cfg, state in models]
    finally:
        distributed.shutdown()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, nargs="+", help="run dir, its checkpoints/ dir, or a checkpoint tag dir")
    p.add_argument("--data", required=True, nargs="+", metavar="[LANG=]PREFIX",
                   help="prefix of a .bin/.idx pair, or several LANG=PREFIX for a loss per language")
    p.add_argument("--seq-length", type=int, default=0, help="default: the run's train.seq_length")
    p.add_argument("--max-tokens", type=int, default=0, help="tokens to predict; 0: the whole file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="train", choices=["train", "fp32", "bf16"],
                   help="train (default): the run's train.precision on this device, as the trainer evaluated")
    args = p.parse_args(argv)
    for result in _evaluate(args) or []:
        print(json.dumps(result), flush=True)


def _evaluate(args) -> list[dict] | None:
    # stdout carries only the result line; DeepSpeed's import-time logger and op loader print to stdout.
    with cli_errors(), contextlib.redirect_stdout(sys.stderr):
        from megatron.core import parallel_state

        from cherry_megatron import distributed
        from cherry_megatron.config import ParallelConfig
        from cherry_megatron.convert.load import load_model
        from cherry_megatron.data.indexed import check_tokenizer, token_stream
        from cherry_megatron.engine import compute_dtype
        from cherry_megatron.errors import CheckpointError

        data = _languages(args.data)
        streams = {lang: token_stream(prefix) for lang, prefix in data.items()}
        top = {lang: int(stream.max()) for lang, stream in streams.items()}  # one pass per file, not per model
        distributed.set_threads(0)
        layout = distributed.init(ParallelConfig(tp=1))
        results = []
        try:  # an in-process caller (tests, tools) must find no world left behind, error or not
            for load in args.load:
                model, cfg = load_model(load)
                dtype = compute_dtype(cfg.train.precision if args.precision == "train" else args.precision, layout.device)
                model = model.to(device=layout.device, dtype=dtype)
                per = {}
                for lang, prefix in data.items():
                    check_tokenizer(prefix, cfg.data.tokenizer_model, f"the model {load}")
                    if top[lang] >= cfg.model.vocab_size:
                        raise CheckpointError(f"{prefix} holds token id {top[lang]}, beyond the model's "
                                              f"vocabulary {cfg.model.vocab_size}: data and checkpoint come from "
                                              "different tokenizers")
                    loss, n = window_loss(model, streams[lang], args.seq_length or cfg.train.seq_length,
                                          args.max_tokens, args.batch_size, layout.device, layout.dp_rank, layout.dp,
                                          parallel_state.get_data_parallel_group())
                    per[lang] = {"loss": loss, "tokens": n}
                del model
                n = sum(r["tokens"] for r in per.values())
                loss = sum(r["loss"] * r["tokens"] for r in per.values()) / n if n else float("nan")
                results.append({**({"languages": per} if None not in data else {}), "loss": loss,
                                "ppl": float(np.exp(loss)), "tokens": n, **({"load": load} if len(args.load) > 1 else {})})
        finally:
            distributed.shutdown()
        return results if layout.rank == 0 else None

def _languages(items: list[str]) -> dict:
    """{lang: prefix} of --data; {None: prefix} for one plain prefix."""
    from cherry_megatron.data.blend import lang_pairs

    if len(items) == 1 and "=" not in items[0]:
        return {None: items[0]}
    return lang_pairs(items, "PREFIX", "--data")


if __name__ == "__main__":
    main()
