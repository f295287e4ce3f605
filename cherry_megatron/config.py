"""The typed config tree: dataclasses loaded from YAML presets with `--set key=value` overrides.

A YAML file may start from a preset (`base: tiny`, or a path); keys are merged recursively on top,
then each `--set a.b=value` (value parsed as YAML) is applied. A checkpoint directory (a Hugging Face model
dir, a torch export, a run dir) may stand wherever a config is named (`--config data/models/smollm2-135m`,
`base: DIR`): it gives the architecture (model, recurrent, moee) and the tokenizer, and sets
`model.init_from` to itself; everything else keeps the defaults. Every key is checked against the
dataclasses, so a typo is an error, not a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from cherry_megatron.config_checks import validate
from cherry_megatron.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: the tokenizer's vocabulary, padded as Megatron pads it
    make_vocab_size_divisible_by: int = 128  # times parallel.tp, as in Megatron-LM
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (no grouped-query attention)
    ffn_hidden_size: int = 0  # 0: SwiGLU default, 8/3 * hidden rounded up to a multiple of 64
    kv_channels: int = 0  # the head dimension; 0: hidden_size / num_heads (a pruned model keeps its heads' width)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    init_from: str = ""  # a checkpoint (run dir, tag dir, or tools/compress_depth.py output) to start from

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 64 * -(-(8 * self.hidden_size // 3) // 64)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    pipeline_partition: str = "layers"  # layers: equal block counts per stage; parameters: equal parameter counts
    zero_init: bool = True  # ZeRO-3: build each module's weights partitioned (deepspeed.zero.Init); same weights
    zero_stage: int = 1
    ds_config: str = ""  # a DeepSpeed JSON; "" picks ds_configs/zero{zero_stage}.json
    backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise


@dataclass
class DataConfig:
    # Megatron-style blend: [prefix] or [weight, prefix, weight, prefix, ...]
    paths: list = field(default_factory=list)
    blend_file: str = ""  # a language blend (tools/build_blend.py): sets `paths`, names the languages logged
    eval_path: str = ""  # held-out prefix, evaluated by `evaluate.window_loss`
    tokenizer_model: str = ""
    eod_mask_loss: bool = False
    shuffle_tokens: bool = False  # permute the tokens inside every sample: the control for SGT's gradient coupling
    cache_dir: str = ""  # "": <run-dir>/data_cache


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_tokens: int = 32768
    save_interval: int = 100
    exit_at_step: int = 0  # stop (with a checkpoint) after this step without changing the schedule
    max_nan_steps: int = 5  # non-finite losses in a row (each update skipped) before the run stops
    step_timeout_s: float = 1800.0  # a step running longer dumps all stacks and exits; 0: no watchdog
    # A collective waiting longer fails with an error, in every process group (world, TP, DP, PP, expert);
    # below step_timeout_s, so a lost peer surfaces as the collective's error before the watchdog's exit.
    collective_timeout_s: float = 600.0
    precision: str = "auto"  # auto: bf16 on GPUs that have it, fp32 elsewhere; or fp32/bf16/fp16
    peak_tflops: float = 0.0  # per process, for MFU; 0: looked up for the device
    memory_limit_gib: float = 0.0  # per rank: refuse a layout cherry-plan estimates above it; 0: no check
    threads: int = 0  # torch threads per process; 0: cores / local processes
    activation_checkpointing: int = 0  # recompute activations in backward: 0 none, 1 every layer, n every n-th
    compile: bool = False  # torch.compile each block (bench/compile_step.py measures it against eager)
    # Early-exit training for any model (LayerSkip): after each of these layer units the shared head reads out and
    # its next-token loss is added with its weight to the ground-truth loss (so distill.ce_weight scales it too,
    # and the logged `loss` includes it); a recurrent model's recurrent.exit_* come first, these override a depth.
    exit_depths: list[int] = field(default_factory=list)
    exit_loss_weights: list[float] = field(default_factory=list)
    exit_distill_weight: float = 0.0  # + this x KL(final distribution, detached || each exit's), RRT's exit KD
    # A DeepSpeed universal checkpoint (tools/convert_checkpoint.py --output-format universal) to resume from,
    # optimizer state included, at this config's TP/DP layout, while the run dir holds no checkpoint of its own.
    universal_from: str = ""
    # Train only the parameters whose names match this regular expression (re.search; the rest frozen), e.g.
    # `router|gate\.wg` for the routers alone after expert pruning, UNCURL's last step; "": every parameter.
    trainable: str = ""


@dataclass
class RecurrentConfig:
    """A recurrent (looped) model: `num_blocks` unique blocks unrolled to `model.num_layers` positions."""
    num_blocks: int = 0  # K; 0: a dense model (every position its own block)
    schedule: list[int] = field(default_factory=list)  # block per position; []: each block num_layers/K times in a row
    lora_rank: int = 0  # per-position LoRA on q, kv, o, gate_up, down; 0: strict sharing
    iteration_embedding: bool = True  # a learned vector per position added to the residual stream
    iteration_norms: bool = True  # RMSNorm weights per position instead of per block
    exit_depths: list[int] = field(default_factory=list)  # positions after which the head may read out (early exit)
    exit_loss_weights: list[float] = field(default_factory=list)  # each exit's loss weight, added to the final loss

    def resolved_schedule(self, num_layers: int) -> list[int]:
        if self.schedule:
            return [int(b) for b in self.schedule]
        return [i * self.num_blocks // num_layers for i in range(num_layers)]


@dataclass
class SGTConfig:
    """Selective ground-truth token training: supervise `ratio` of the output positions (cherry_megatron/sgt.py)."""
    ratio: float = 1.0  # 1.0: every position supervised (SGT off)
    policy: str = "random"  # random | frequency | loss | excess | payload
    # top: the round(ratio*n) best-scored positions, loss averaged over them (biased: unpicked positions never
    # learn); poisson | conditional: positions drawn with probability pi ~ score^(1/temperature), expected
    # (poisson) or exact (conditional) count ratio*n, losses weighted 1/pi: an unbiased full-loss estimate
    sampling: str = "top"
    temperature: float = 1.0  # poisson/conditional: pi ~ score^(1/T); large T tends to uniform
    max_weight: float = 0.0  # clip the 1/pi loss weights at this (biased, less variance); 0: no clipping
    seed: int = 0  # with train.seed, seeds random's scores and the draws: another value, another draw of the same batches
    scope: str = "sequence"  # sequence: round(ratio*n) per sequence; batch: per micro-batch
    anchor_weight: float = 0.0  # a: L = (1-a) L_selected + a L_full
    reference: str = ""  # checkpoint (run dir or tag dir) of the frozen reference model, for policy=excess
    counts: str = ""  # unigram counts .npy (tools/token_counts.py); "": counted from data.paths at start
    probe_interval: int = 0  # every N steps log gamma (supervised/unsupervised gradient cosine); 0: off


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (cherry_megatron/distill.py). Minitron: logits KL only, tau 1."""
    teacher: str = ""  # run dir, checkpoint, converted or Hugging Face dir of the teacher; "": no distillation
    temperature: float = 1.0  # tau of both softmaxes
    kd_weight: float = 1.0  # weight of KL(p_teacher || p_student), mean over the valid positions
    ce_weight: float = 1.0  # weight of the next-token loss on the ground truth (0: logits distillation only)
    hidden_weight: float = 0.0  # weight of 1 - cos(final hidden states); needs the teacher's width


@dataclass
class MoEEConfig:
    """Mixture of Efficient Experts (model/moee.py) and multi-token prediction (model/mtp.py)."""
    num_experts: int = 0  # E; 0: no MoE layers. Each block's MLP becomes E experts behind a router
    top_k: int = 1  # experts per token
    ep_size: int = 1  # expert-parallel ranks (deepspeed.moe); divides num_experts and the data-parallel size
    # Expert capacity per batch. 0: dropless, no token is ever dropped (exact at every EP layout), but DeepSpeed
    # reads the largest expert load back to size its buffers: one host sync per routed layer and micro-batch.
    # On GPUs, where that stalls the queue, 1.25 (GShard/Switch) has none; tokens over capacity are dropped.
    capacity_factor: float = 0.0
    load_balance_weight: float = 0.01  # Switch/GShard auxiliary loss, per routed layer
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE), per routed layer
    router_jitter: float = 0.0  # DeepSpeed's multiplicative input jitter while training; 0: off
    mtp_depth: int = 0  # sequential multi-token-prediction modules (DeepSeek-V3); predicts t+2..t+1+depth
    mtp_weight: float = 0.1  # weight of the mean MTP loss (megatron-core's default)


@dataclass
class SMoEConfig:
    """A JetMoE-style sparse model (model/smoe.py): every layer a Mixture of Attention heads and a mixture of
    SwiGLU MLP experts (`model.ffn_hidden_size` each). Routing and its knobs as `moee`'s; gates are the softmax
    over each token's top-k logits (they sum to 1, also at k=1), and the losses are JetMoE's."""
    num_experts: int = 0  # E; 0: not a sparse model. Experts per layer, in the MLP and (attention_experts) the MoA
    top_k: int = 2  # experts per token, in both
    ep_size: int = 1  # expert-parallel ranks for the MLP experts (deepspeed.moe); the MoA experts stay replicated
    attention_experts: bool = True  # Mixture of Attention heads; false: dense attention, routed MLPs only
    capacity_factor: float = 0.0  # 0: dropless (moee.capacity_factor says what it costs)
    # JetMoE's objective: 0.01 x (switch load balancing + 0.1 x z-loss), per router (MoA and MLP logged apart)
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    router_jitter: float = 0.0  # DeepSpeed's multiplicative jitter on the MLP router's input while training


def routing(cfg) -> "MoEEConfig | SMoEConfig | None":
    """The config section whose routed MLPs the model has (`smoe` or `moee`), or None for a model without."""
    return cfg.smoe if cfg.smoe.num_experts else cfg.moee if cfg.moee.num_experts else None


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    sgt: SGTConfig = field(default_factory=SGTConfig)
    moee: MoEEConfig = field(default_factory=MoEEConfig)
    smoe: SMoEConfig = field(default_factory=SMoEConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys a resumed run may change without it being a different run.
RESUMABLE_KEYS = {"train.steps", "train.exit_at_step", "train.log_interval", "train.eval_interval",
                  "train.save_interval", "train.eval_tokens", "train.threads", "train.peak_tflops",
                  "data.cache_dir", "parallel.backend", "sgt.probe_interval", "train.activation_checkpointing",
                  "train.compile", "parallel.zero_init",
                  "train.memory_limit_gib", "train.max_nan_steps", "train.step_timeout_s", "train.collective_timeout_s"}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is list or typing.get_origin(typ) is list:
        item = (typing.get_args(typ) or (None,))[0]
        if isinstance(value, list) and item in (int, float):
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, list):  # untyped: strings (data.paths mixes weights and prefixes)
            return [str(v) if isinstance(v, (int, float)) else v for v in value]
        if isinstance(value, str):
            return [value]
    else:
        raise ConfigError(f"config key '{key}' has an unsupported type {typ}")
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{path}' (known under '{prefix or '.'}': {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; give it a mapping")
            _apply(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def read_yaml(path: Path, what: str = "config"):
    """A YAML file's document (configs, recipes, blend files), any failure one ConfigError naming `what`."""
    try:
        text = Path(path).read_text(encoding="utf-8")  # not the locale's: a file reads the same on every machine
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): a corrupt or binary file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {what} {path}: {str(e).splitlines()[0]}") from None


def _read_yaml(path: Path) -> dict:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def _resolve(name_or_path: str, seen: tuple = (), read_checkpoint=None) -> list[dict]:
    """The chain of YAML layers, base first. `read_checkpoint(dir) -> layer` reads a checkpoint directory
    (convert.load.checkpoint_layer, passed in by the tools that accept one: reading checkpoints sits above
    the config in the import order)."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"no config file or preset '{name_or_path}' (presets: {presets})")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    if path.is_dir():
        if read_checkpoint is None:
            raise ConfigError(f"{path} is a directory: this tool takes a YAML config or a preset, not a checkpoint")
        return [read_checkpoint(path)]
    data = _read_yaml(path)
    base = data.pop("base", None)
    layers = _resolve(str(base), seen + (path.resolve(),), read_checkpoint) if base else []
    return layers + [data]


def parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}' as YAML") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def check_keys(overrides: list[str]) -> None:
    """`--set` items name config keys of the right shape (what `load_config` would refuse first), without a
    model to validate them against."""
    for item in overrides:
        _apply(Config(), parse_override(item))


def load_config(config: str, overrides: Optional[list[str]] = None, read_checkpoint=None) -> Config:
    cfg = Config()
    for layer in _resolve(config, read_checkpoint=read_checkpoint):
        _apply(cfg, layer)
    for item in overrides or []:
        _apply(cfg, parse_override(item))
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
