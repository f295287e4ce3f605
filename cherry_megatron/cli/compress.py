"""Compress a dense checkpoint into a recurrent model of K shared blocks (cherry_megatron/compress/depth.py).

    cherry-compress --load DENSE_CKPT --target-layers K --output DIR
        [--init average|stepwise|lower] [--lora-rank r] [--eval-data PREFIX] [--eval-tokens N]

DENSE_CKPT is a run dir or checkpoint at any TP degree. DIR receives model.safetensors,
cherry_config.json and config.yaml; continue training with
    python -m cherry_megatron.train --config DIR/config.yaml --run-dir RUN   (it sets model.init_from=DIR)
Prints parameter counts before and after, and held-out loss of both models right after compression.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from cherry_megatron.errors import cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--target-layers", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--init", default="average")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--eval-data", default="", help="held-out prefix; default: the run's data.eval_path")
    p.add_argument("--eval-tokens", type=int, default=16384, help="0: the whole file")
    args = p.parse_args(argv)
    with cli_errors():
        from cherry_megatron.checkpoint.consolidate import save_consolidated
        from cherry_megatron.convert.load import load_consolidated
        from cherry_megatron.compress.depth import compress
        from cherry_megatron.config import from_dict, to_yaml
        from cherry_megatron.errors import CheckpointError
        from cherry_megatron.evaluate import heldout_losses
        from cherry_megatron.model import parameter_count

        if Path(args.output).exists():
            raise CheckpointError(f"{args.output} exists already; choose a new --output")
        state, cfg_dict = load_consolidated(args.load)
        dense = from_dict(cfg_dict)
        small_state, small = compress(state, dense, args.target_layers, args.init, args.lora_rank)
        out = Path(args.output)
        save_consolidated(out, small_state, small.to_dict())
        small.model.init_from = str(out)
        (out / "config.yaml").write_text(to_yaml(small))
        before, after = parameter_count(dense), parameter_count(small)
        print(f"{'':24}{'dense':>16}{'recurrent':>16}")
        for key in ("layers", "embedding", "head", "total"):
            print(f"{key:24}{before[key]:>16,}{after[key]:>16,}")
        print(f"{'unique blocks':24}{dense.model.num_layers:>16}{args.target_layers:>16}")
        result = {"output": str(out), "init": args.init, "lora_rank": args.lora_rank,
                  "params_dense": before["total"], "params_recurrent": after["total"]}
        data = args.eval_data or dense.data.eval_path
        if data:
            result["heldout_loss_dense"], result["heldout_loss_recurrent"] = heldout_losses(
                [(dense, state), (small, small_state)], data, args.eval_tokens)
            from cherry_megatron.data.tokenizer import load_tokenizer

            vocab = load_tokenizer(dense.data.tokenizer_model).vocab_size if dense.data.tokenizer_model else \
                dense.model.vocab_size
            result["uniform_loss"] = math.log(vocab)
            print(f"held-out loss: dense {result['heldout_loss_dense']:.4f}, recurrent right after compression "
                  f"{result['heldout_loss_recurrent']:.4f}, uniform distribution {result['uniform_loss']:.4f}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
