"""Convert a checkpoint between formats and parallel layouts.

    cherry-convert --input PATH --input-format deepspeed|torch|hf|gguf
        --output PATH --output-format deepspeed|universal|torch|hf
        [--target-tp N] [--target-pp M] [--dtype fp32|bf16|fp16] [--tokenizer SP.model|HF_DIR]

Formats:
  deepspeed  our training checkpoints (a run dir, its checkpoints/ or a tag dir) at any TP/PP/DP and ZeRO
             stage; as output, module weights in DeepSpeed's layout for --target-tp x --target-pp (start a
             run from it with model.init_from=PATH; DeepSpeed's load_checkpoint(load_module_only=True) reads it)
  universal  (output only) DeepSpeed universal checkpoint with the optimizer state: resume at another DP/TP
             with `--set train.universal_from=PATH parallel.tp=N` (dense, PP=1 runs)
  torch      one model.safetensors + cherry_config.json, TP=1
  hf         a Hugging Face Llama directory (config.json, model.safetensors, tokenizer files) that
             transformers' AutoModelForCausalLM loads without custom code, or a JetMoe one for a sparse
             (smoe) model; as input, any Llama or JetMoe checkpoint (model.safetensors or model-*.safetensors
             shards)
  gguf       (input only) a Llama-architecture llama.cpp GGUF file, dequantized to fp32 by transformers'
             GGUF loader (needs the `gguf` and `accelerate` packages); its tokenizer is written beside the
             weights as tokenizer.json, whatever the output format
A Hugging Face tokenizer travels with the weights: every output holds a copy of it and its config names it.
The output appears whole or not at all: it is written to PATH.partial and renamed. Nothing is unpickled
beyond tensors and three DeepSpeed data classes (torch.load weights_only=True).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from cherry_megatron.errors import CheckpointError, ConfigError, cli_errors

INPUTS = ("deepspeed", "torch", "hf", "gguf")
OUTPUTS = ("deepspeed", "universal", "torch", "hf")


def read(path: str, fmt: str):
    from cherry_megatron.convert import checkpoint, gguf_import, hf_import

    if not Path(path).exists():
        raise CheckpointError(f"--input {path} does not exist")
    return {"deepspeed": checkpoint.read_deepspeed, "torch": checkpoint.read_torch, "hf": hf_import.read_hf,
            "gguf": gguf_import.read_gguf}[fmt](path)


def check_layout(cfg_dict: dict, tp: int, pp: int) -> None:
    from cherry_megatron.config import from_dict, validate

    cfg = from_dict(json.loads(json.dumps(cfg_dict)))
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    m = cfg.model
    if tp < 1 or pp < 1:
        raise ConfigError(f"--target-tp={tp} / --target-pp={pp} must be >= 1")
    if pp > m.num_layers:
        raise ConfigError(f"--target-pp={pp} exceeds the model's {m.num_layers} layers")
    cfg.moee.ep_size = cfg.smoe.ep_size = 1  # expert files hold global expert ids: a run picks its own expert parallelism
    cfg.sgt.ratio = 1.0  # a layout check: training-only settings that a pipeline refuses do not matter here
    cfg.recurrent.exit_depths, cfg.recurrent.exit_loss_weights = [], []
    try:
        validate(cfg, tp * pp)
    except ConfigError as e:
        raise ConfigError(str(e).replace("parallel.tp", "--target-tp").replace("parallel.pp", "--target-pp")) from None
    if m.vocab_size % tp:
        raise ConfigError(f"--target-tp={tp} does not divide the vocabulary ({m.vocab_size})")


def convert(args) -> dict:
    from cherry_megatron import distributed  # noqa: F401 (imported before the clock starts)
    from cherry_megatron.convert import checkpoint, hf_import, safe_load, universal, writers  # noqa: F401
    from cherry_megatron.model import build_model  # noqa: F401

    safe_load._allowed()

    out = Path(args.output)
    if out.exists():
        raise CheckpointError(f"--output {out} exists already; refusing to overwrite it")
    if args.output_format in ("torch", "hf") and (args.target_tp, args.target_pp) != (1, 1):
        raise ConfigError(f"--output-format {args.output_format} is TP=1, PP=1; --target-tp/--target-pp apply to deepspeed")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        if args.output_format == "universal":
            if args.input_format != "deepspeed":
                raise CheckpointError("--output-format universal needs a deepspeed training checkpoint (with optimizer state)")
            if args.dtype != "fp32" and args.dtype is not None:
                raise ConfigError("--output-format universal keeps DeepSpeed's fp32 optimizer state; drop --dtype")
            universal.write_universal(args.input, tmp)
            nbytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        else:
            ck = read(args.input, args.input_format)
            extra = checkpoint.validate(ck)
            check_layout(ck.cfg, args.target_tp, args.target_pp)
            dtype = writers.DTYPES[args.dtype] if args.dtype else None
            if args.output_format == "torch":
                writers.write_torch(ck, tmp, dtype, out)
            elif args.output_format == "hf":
                tok = args.tokenizer or ck.cfg.get("data", {}).get("tokenizer_model")
                writers.write_hf(ck, tmp, dtype, tok)
            else:
                writers.write_deepspeed(ck, tmp, args.target_tp, args.target_pp, dtype, extra, out)
            nbytes = ck.nbytes
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    return {"output": str(out), "format": args.output_format, "tp": args.target_tp, "pp": args.target_pp,
            "bytes": nbytes, "seconds": round(seconds, 3), "gb_per_s": round(nbytes / 1e9 / max(seconds, 1e-9), 3)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--input-format", required=True, help="|".join(INPUTS))
    p.add_argument("--output", required=True)
    p.add_argument("--output-format", required=True, help="|".join(OUTPUTS))
    p.add_argument("--target-tp", type=int, default=1)
    p.add_argument("--target-pp", type=int, default=1)
    p.add_argument("--dtype", default=None, help="fp32|bf16|fp16 (default: the source's)")
    p.add_argument("--tokenizer", default="", help="hf output: the sentencepiece model or Hugging Face tokenizer directory (default: the checkpoint's)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    with cli_errors():
        if args.input_format not in INPUTS:
            raise ConfigError(f"unknown --input-format {args.input_format!r} (one of {', '.join(INPUTS)})")
        if args.output_format not in OUTPUTS:
            raise ConfigError(f"unknown --output-format {args.output_format!r} (one of {', '.join(OUTPUTS)})")
        if args.dtype not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown --dtype {args.dtype!r} (fp32, bf16 or fp16)")
        # Library loggers print to stdout; it carries only the result line.
        with contextlib.redirect_stdout(sys.stderr):
            result = convert(args)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
