"""Everything checked before a run writes anything or joins a process group: the config at the job's world
size, the tokenizer and the vocabulary it implies, the data files, the run dir (a different run's is
refused) and a universal checkpoint to resume from. The trainer and `cherry-submit` run the same checks,
so a job that would fail at start is refused at submission."""
from __future__ import annotations

from pathlib import Path

from megatron.core.datasets.utils import get_blend_from_list

from cherry_megatron.checkpoint.run_dir import check_run_dir, checkpoint_dir, latest_tag
from cherry_megatron.config import Config, load_config, validate
from cherry_megatron.convert.load import checkpoint_layer
from cherry_megatron.convert.universal import check_universal
from cherry_megatron.data.blend import check_caps, resolve as resolve_blend
from cherry_megatron.data.indexed import check_tokenizer, open_indexed
from cherry_megatron.data.tokenizer import load_tokenizer
from cherry_megatron.errors import ConfigError
from cherry_megatron.model.gpt import pad_vocab


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> None:
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = pad_vocab(tokenizer_vocab, m.make_vocab_size_divisible_by, cfg.parallel.tp)
    elif tokenizer_vocab > m.vocab_size:
        raise ConfigError(f"tokenizer vocabulary ({tokenizer_vocab}) is larger than model.vocab_size ({m.vocab_size})")
    if m.vocab_size % cfg.parallel.tp:
        raise ConfigError(f"parallel.tp={cfg.parallel.tp} does not divide model.vocab_size={m.vocab_size}")


def check_memory(cfg: Config, world_size: int) -> None:
    """`train.memory_limit_gib` > 0: the planner's per-rank estimate for this layout (`cherry-plan`'s terms, in
    the precision the run will compute in) must fit, or the run is refused before any weight is built."""
    limit = cfg.train.memory_limit_gib
    if limit <= 0:
        return
    if cfg.recurrent.num_blocks or cfg.moee.num_experts or cfg.smoe.num_experts:
        raise ConfigError("train.memory_limit_gib: the planner models dense models only; set it to 0 for this model")
    import torch

    from cherry_megatron.cli.plan import Layout, memory_estimate
    from cherry_megatron.engine import resolve_precision

    p = cfg.parallel
    precision = resolve_precision(cfg.train.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    r = memory_estimate(cfg, Layout(p.tp, p.pp, world_size // (p.tp * p.pp), p.zero_stage), precision)
    if r["total_gib"] > limit:
        raise ConfigError(
            f"the planner estimates {r['total_gib']:.2f} GiB per rank for tp={p.tp} pp={p.pp} dp={r['dp']} "
            f"zero={p.zero_stage} in {precision} (weights {r['weights_gib']:.2f}, gradients {r['grads_gib']:.2f}, "
            f"optimizer {r['optimizer_gib']:.2f}, activations {r['activations_gib']:.2f}, buffers "
            f"{r['buffers_gib']:.2f}), above train.memory_limit_gib={limit:g}: raise parallel.zero_stage, add ranks, "
            "or set train.activation_checkpointing")


def check_data(cfg: Config) -> None:
    """Every data file opens and is whole."""
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty: give one or more .bin/.idx prefixes (optionally weighted)")
    prefixes = get_blend_from_list([str(p) for p in cfg.data.paths])[0]
    for prefix in prefixes + ([cfg.data.eval_path] if cfg.data.eval_path else []):
        open_indexed(prefix)
        check_tokenizer(prefix, cfg.data.tokenizer_model, "data.tokenizer_model")


def preflight(config: str, overrides: list[str], run_dir: Path | None, world_size: int):
    """(resolved config, tokenizer, run dir) of a run about to start at `world_size` processes in `run_dir`
    (None: runs/<config name>)."""
    cfg = load_config(config, overrides, read_checkpoint=checkpoint_layer)
    resolve_blend(cfg.data)
    run_dir = Path(run_dir) if run_dir else Path(f"runs/{cfg.name}")
    validate(cfg, world_size)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    resolve_vocab(cfg, tokenizer.vocab_size)
    check_memory(cfg, world_size)
    check_data(cfg)
    check_caps(cfg.data, cfg.train.steps * cfg.train.global_batch_size * cfg.train.seq_length, cfg.train.seq_length)
    check_run_dir(run_dir, cfg)
    if cfg.train.universal_from and latest_tag(checkpoint_dir(run_dir)) is None:
        check_universal(Path(cfg.train.universal_from), cfg)
    return cfg, tokenizer, run_dir
