"""`python -m cherry_megatron.model.count PRESET_OR_YAML`: a preset's parameter count, analytic and counted."""
from __future__ import annotations

import argparse
import json

import torch

from cherry_megatron import distributed
from cherry_megatron.config import ParallelConfig, load_config
from cherry_megatron.errors import cli_errors
from cherry_megatron.model import build_model, parameter_count
from cherry_megatron.model.gpt import pad_vocab


def main(argv=None) -> None:
    """`python -m cherry_megatron.model.count PRESET_OR_YAML [--set k=v ...]`: the parameter count, analytic
    and counted on a meta-device model (shapes only, so the 1B preset costs no memory)."""
    p = argparse.ArgumentParser(description="parameter count of a preset")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args(argv)
    with cli_errors():
        cfg = load_config(args.config, args.overrides)
        if cfg.model.vocab_size == 0:  # the trainer takes it from the tokenizer; count the preset's default
            cfg.model.vocab_size = pad_vocab(8192, cfg.model.make_vocab_size_divisible_by, 1)
        distributed.init(ParallelConfig())
        try:
            with torch.device("meta"):
                counted = sum(t.numel() for t in build_model(cfg).parameters())
        finally:
            distributed.shutdown()
        print(json.dumps({**parameter_count(cfg), "counted": counted, "vocab_size": cfg.model.vocab_size}))


if __name__ == "__main__":
    main()
