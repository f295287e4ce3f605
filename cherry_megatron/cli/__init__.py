"""The command-line tools, one module per stage of the data's path; each has `main(argv=None)` and a console
script (pyproject.toml [project.scripts]; `python tools/<old name>.py` still runs the same main):

    tokenizer.py   cherry-train-tokenizer  corpus .jsonl/.txt -> sentencepiece model     (tools/train_tokenizer.py)
    preprocess.py  cherry-preprocess       corpus + tokenizer -> Megatron .bin/.idx      (tools/preprocess_data.py)
    plan.py        cherry-plan             preset + cluster -> memory/comms per layout   (tools/plan.py)
                   cherry-train            cherry_megatron.train: tokens -> run dir with checkpoints
                   cherry-submit           cherry_megatron.launch.slurm submit: the same, as a SLURM job
                   cherry-evaluate         cherry_megatron.evaluate: checkpoint + held-out tokens -> loss
    compress.py    cherry-compress         dense checkpoint -> recurrent model           (tools/compress_depth.py)
    prune.py       cherry-prune            checkpoint -> narrower/shallower model        (tools/prune.py)
    prune_experts.py                       routed checkpoint -> fewer experts for a task (tools/prune_experts.py)
    build_moee.py  cherry-build-moee       compressed checkpoints -> MoEE checkpoint     (tools/build_moee.py)
    generate.py    cherry-generate         checkpoint + prompts -> generated text        (python -m cherry_megatron.generate)
    convert.py     cherry-convert          any checkpoint -> another format / TP x PP    (tools/convert_checkpoint.py)

This module stays import-light: every console script imports it first. The tools import what they use inside
`main`, after argument parsing: `--help` and a usage error answer without loading torch and DeepSpeed.
"""
from __future__ import annotations


# A console script exits with sys.exit(main()): a non-None return (the trainer's summary dict, the job id of
# a submit) would print to stderr and exit 1. These entry points drop it; in-process callers use the mains.

def train() -> None:
    """cherry-train: python -m cherry_megatron.train."""
    from cherry_megatron.train import main

    main()


def evaluate() -> None:
    """cherry-evaluate: python -m cherry_megatron.evaluate."""
    from cherry_megatron.evaluate import main

    main()


def submit() -> None:
    """cherry-submit: python -m cherry_megatron.launch.slurm submit."""
    from cherry_megatron.launch.slurm import submit_main

    submit_main()
