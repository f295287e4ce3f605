"""Held-out loss and perplexity of a checkpoint, by a rule any other tool can reproduce.

    python -m cherry_megatron.evaluate --load RUN_DIR_OR_CHECKPOINT --data PREFIX [--seq-length S] [--max-tokens N]

The data file's token stream in stored order (documents concatenated as written, EOD included) is cut
into windows tokens[k*S : k*S+S+1]: the first S are the input, the last S the targets. Windows are
taken for k = 0, 1, ... until N tokens are predicted (the last window is shortened to land on N
exactly). Nothing is shuffled or masked; `loss` is the mean over all predicted tokens.
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
    """(mean loss, tokens predicted); `forward(tokens, labels)` returns per-token losses [b, s].

    Windows are dealt round-robin over data-parallel ranks and the sums all-reduced.
    """
    mine = windows(len(stream), seq_length, max_tokens)[dp_rank::dp]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for length in sorted({n for _, n in mine}, reverse=True):
        starts = [s for s, n in mine if n == length]
        for i in range(0, len(starts), batch_size):
            chunk = np.stack([np.asarray(stream[s:s + length + 1], dtype=np.int64) for s in starts[i:i + batch_size]])
            x = torch.from_numpy(chunk).to(device)
            losses = forward(x[:, :-1], x[:, 1:])
            total[0] += losses.double().sum()
            total[1] += losses.numel()
    if dp > 1:
        dist.all_reduce(total, group=group)
    return (total[0] / total[1]).item(), int(total[1].item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="run dir, its checkpoints/ dir, or a checkpoint tag dir")
    p.add_argument("--data", required=True, help="prefix of a .bin/.idx pair")
    p.add_argument("--seq-length", type=int, default=0, help="default: the run's train.seq_length")
    p.add_argument("--max-tokens", type=int, default=0, help="tokens to predict; 0: the whole file")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    result = _evaluate(args)
    if result is not None:
        print(json.dumps(result), flush=True)


def _evaluate(args) -> dict | None:
    # stdout carries only the result line; DeepSpeed's import-time logger and op loader print to stdout.
    with cli_errors(), contextlib.redirect_stdout(sys.stderr):
        from cherry_megatron import distributed
        from cherry_megatron.checkpoint.consolidate import load_consolidated, load_into
        from cherry_megatron.config import ParallelConfig, from_dict
        from cherry_megatron.data.indexed import token_stream
        from cherry_megatron.errors import CheckpointError
        from cherry_megatron.model import build_model

        state, cfg_dict = load_consolidated(args.load)
        cfg = from_dict(cfg_dict)
        cfg.moee.ep_size = 1  # the consolidated state holds every expert; each rank keeps them all
        stream = token_stream(args.data)
        if int(stream.max()) >= cfg.model.vocab_size:
            raise CheckpointError(f"{args.data} holds token id {int(stream.max())}, beyond the model's vocabulary "
                                  f"{cfg.model.vocab_size}: data and checkpoint come from different tokenizers")
        distributed.set_threads(0)
        layout = distributed.init(ParallelConfig(tp=1))
        model = build_model(cfg)
        load_into(model, state, args.load)
        model.to(layout.device)
        model.eval()
        from megatron.core import parallel_state

        loss, n = window_loss(model, stream, args.seq_length or cfg.train.seq_length, args.max_tokens,
                              args.batch_size, layout.device, layout.dp_rank, layout.dp,
                              parallel_state.get_data_parallel_group())
        distributed.shutdown()
        return {"loss": loss, "ppl": float(np.exp(loss)), "tokens": n} if layout.rank == 0 else None


if __name__ == "__main__":
    main()
