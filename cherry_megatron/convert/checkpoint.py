"""A checkpoint in any format or layout, read as one full (TP=1) model: its config and a lazy tensor per name.

Readers index the files first (shapes from headers, tensors memory-mapped) and materialise one full tensor
at a time when a writer asks for it, so a conversion holds about one tensor (and the pages of the shard it
comes from), not the model. `validate` checks the names and shapes against the model the config builds.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from megatron.core import parallel_state
from safetensors import SafetensorError, safe_open

from cherry_megatron import compat, distributed
from cherry_megatron.checkpoint.consolidate import CONSOLIDATED_CONFIG, CONSOLIDATED_WEIGHTS, resolve_tag_dir
from cherry_megatron.config import ParallelConfig, from_dict
from cherry_megatron.convert import safe_load, zero_masters
from cherry_megatron.convert.safetensors_stream import DTYPES
from cherry_megatron.errors import CheckpointError, UserError
from cherry_megatron.model import build_model, layout_table
from cherry_megatron.model.tp_layout import merged_shape, tp_merge


@dataclass
class Checkpoint:
    cfg: dict  # the run's config (Config.to_dict())
    specs: dict[str, tuple[torch.dtype, tuple]]  # full name -> (dtype, shape), in the model's order
    fetch: Callable[[str], torch.Tensor] = field(repr=False)
    source: str = ""
    step: int = 0
    _layout: Callable | None = field(default=None, repr=False)
    keep: object = field(default=None, repr=False)  # what must outlive the reading (a GGUF's tokenizer dir)

    def get(self, name: str) -> torch.Tensor:
        return self.fetch(name)

    def layout(self, name: str):
        """How `name` splits over TP ranks, for writers that re-shard (`table_layout`)."""
        if self._layout is None:
            self._layout = table_layout(self.cfg, self.source)
        return self._layout(name)

    @property
    def nbytes(self) -> int:
        return sum(d.itemsize * torch.Size(s).numel() for d, s in self.specs.values())


def shard_layout(cfg: dict, source: str, tp: int):
    """name -> (dim, stride) or None for merging `tp` shards of a checkpoint of config `cfg`. One shard needs no
    layout, and reading it builds no model."""
    return (lambda name: None) if tp == 1 else table_layout(cfg, source)


def table_layout(cfg: dict, source: str):
    """name -> (dim, stride) or None: the layout the parameters of the model `cfg` describes declare
    (`model.layout_table`); a config that builds no model, or a name its model lacks, is one clear error."""
    try:
        table = layout_table(cfg)
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise CheckpointError(f"{source}: its config does not describe a model we build: {e}") from None

    def layout(name: str):
        try:
            return table(name)
        except KeyError:
            raise CheckpointError(f"{source} holds {name}, which the model its config describes does not have") from None
    return layout


def merge_one(layout, name: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor from its TP slices (a strided weight holds `stride` interleaved blocks per rank)."""
    split = layout(name) if len(slices) > 1 else None
    return slices[0] if split is None else tp_merge(slices, *split)


def _weights(d: dict) -> dict[str, torch.Tensor]:
    # megatron's linear layers save an empty `_extra_state` (Transformer Engine's); it carries no weights.
    return {k: v for k, v in d.items() if torch.is_tensor(v) and not k.endswith("._extra_state")}


class _Master(NamedTuple):
    """A shard's fp32 master, read from the optimizer partitions when asked for (`zero_masters`)."""
    dtype: torch.dtype
    shape: tuple
    read: Callable[[], torch.Tensor]


def _tensor(v) -> torch.Tensor:
    return v.read() if isinstance(v, _Master) else v


def _with_masters(shard: dict, masters: dict) -> dict:
    """The shard with each low-precision module weight replaced by its fp32 master where the optimizer has one."""
    return {n: _Master(torch.float32, tuple(t.shape), masters[n]) if n in masters and t.dtype != torch.float32 else t
            for n, t in shard.items()}


def _shape(shard: dict, name: str) -> tuple | None:
    return tuple(shard[name].shape) if name in shard else None


def _low_precision(shards: list[dict]) -> bool:
    return any(t.dtype in (torch.bfloat16, torch.float16) for s in shards for t in s.values())


def _from_shards(shards: list[dict], cfg: dict, source: str, step: int) -> Checkpoint:
    """TP shards of one state dict (rank order) -> a Checkpoint merging each tensor when asked for."""
    layout = shard_layout(cfg, source, len(shards))
    specs = {n: (t.dtype, merged_shape([s[n].shape for s in shards], layout(n))) for n, t in shards[0].items()}
    missing = [n for s in shards[1:] for n in specs if n not in s]
    if missing:
        raise CheckpointError(f"{source}: TP shards disagree (rank 0 has {missing[0]}, another rank does not)")
    return Checkpoint(cfg, specs, lambda n: merge_one(layout, n, [_tensor(s[n]) for s in shards]), source, step)


# ---------------------------------------------------------------------------------------------- DeepSpeed
_TP_RANK = re.compile(r"mp_rank_(\d+)")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def read_deepspeed(path: str | Path) -> Checkpoint:
    """Our DeepSpeed training checkpoints at any TP/PP/DP and ZeRO stage (and the files `write_deepspeed`
    produces): a run dir, its checkpoints/ or a tag dir."""
    tag_dir = resolve_tag_dir(path)
    meta_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or \
        sorted(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not meta_files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model-states files (mp_rank_*_model_states.pt)")
    metas = [safe_load.load(f) for f in meta_files]
    bad = next(((f, m) for f, m in zip(meta_files, metas) if not isinstance(m, dict)), None)
    if bad:
        raise CheckpointError(f"{bad[0]} is not a DeepSpeed model-states file (it holds a {type(bad[1]).__name__})")
    cfg = metas[0].get("cherry_config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{tag_dir} is not a cherry_megatron checkpoint (no 'cherry_config' in it)")
    step = int(metas[0].get("step", metas[0].get("global_steps", 0)) or 0)
    src = str(tag_dir)
    if cfg["parallel"]["pp"] > 1:  # per-stage mp_rank files, which must not be merged as TP shards
        return _read_pipeline(tag_dir, cfg, src, step)
    if meta_files[0].name.startswith("zero_pp_rank_"):
        return _read_zero3(tag_dir, len(meta_files), cfg, src, step)
    shards = [_weights(m.get("module") or {}) for m in metas]
    experts = _expert_shards(tag_dir)
    if experts:
        shards = [{**s, **e} for s, e in zip(shards, experts)]
    if _low_precision(shards):  # bf16/fp16 module weights: the fp32 masters live in the optimizer partitions
        files = zero_masters.optimizer_files(tag_dir)
        shards = [_with_masters(s, zero_masters.fp32_masters(files.get(r, []), lambda n, s=s: _shape(s, n)))
                  for r, s in enumerate(shards)]
    return _from_shards(shards, cfg, src, step)


def _expert_shards(tag_dir: Path) -> list[dict]:
    """DeepSpeed saves routed experts apart: one file per (MoE layer, global expert id, TP rank), under
    global-id names; grouped here into one dict per TP rank."""
    by_rank: dict[int, dict] = {}
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
        by_rank.setdefault(int(_TP_RANK.search(f.name).group(1)), {}).update(_weights(safe_load.load(f)))
    return [by_rank[r] for r in sorted(by_rank)]


def routed_experts(cfg: dict) -> int:
    """Experts per routed layer of a config dict: a sparse (`smoe`) or MoEE (`moee`) model's; 0 for the rest
    (a checkpoint written before `smoe` existed has no such section)."""
    return (cfg.get("smoe") or {}).get("num_experts", 0) or cfg["moee"]["num_experts"]


def _read_pipeline(tag_dir: Path, cfg: dict, src: str, step: int) -> Checkpoint:
    """DeepSpeed's per-layer files of a pipelined dense model (`model.pipeline.build_pipeline` order:
    embedding, one layer per block, the final norm + head); a tied embedding is saved once, in layer 0."""
    if cfg["recurrent"]["num_blocks"] or routed_experts(cfg):
        # DeepSpeed writes no layer file for a tied layer with its own forward_fn (the shared blocks, which
        # then live in the optimizer state only), and a routed model's stages save no layer files at all.
        raise CheckpointError(f"{tag_dir}: converting pipelined recurrent or routed checkpoints is not supported; "
                              "resume them at their own layout")
    layers = cfg["model"]["num_layers"]

    def full_name(idx: int, name: str) -> str:
        return f"layers.{idx - 1}.{name[len('block.'):]}" if 1 <= idx <= layers else name

    by_rank: dict[int, dict] = {}
    for f in sorted(tag_dir.glob("layer_*-model_*-model_states.pt")):
        idx, rank = (int(g) for g in _LAYER_FILE.search(f.name).groups())
        for name, t in _weights(safe_load.load(f)).items():
            by_rank.setdefault(rank, {}).setdefault(full_name(idx, name), t)
    shards = [by_rank[r] for r in sorted(by_rank)]
    if _low_precision(shards):
        # One optimizer per (stage, TP rank), mp rank = stage * tp + TP rank, naming parameters as the
        # PipelineModule does: "<layer index>.<name in the layer>".
        # A tied module's parameters are "tied_modules.<key>.<name>" (only the embedding: stage 0's layer).
        def ours(pipe_name: str) -> str:
            idx, name = pipe_name.split(".", 1)
            return full_name(int(idx), name) if idx.isdigit() else name.split(".", 1)[1]

        tp = len(shards)
        masters: list[dict] = [{} for _ in shards]
        for mp, files in zero_masters.optimizer_files(tag_dir).items():
            found = zero_masters.fp32_masters(files, lambda n, s=shards[mp % tp]: _shape(s, ours(n)))
            masters[mp % tp].update({ours(n): read for n, read in found.items()})
        shards = [_with_masters(s, m) for s, m in zip(shards, masters)]
    return _from_shards(_model_order(shards), cfg, src, step)


def _model_order(shards: list[dict]) -> list[dict]:
    """Names in the unpipelined model's order (embedding, layers by number, norm, head, MTP)."""
    def key(n: str):
        m = re.match(r"layers\.(\d+)\.", n)
        return (0, 0) if n.startswith("embed.") else (1, int(m.group(1))) if m else (2, 0)
    return [dict(sorted(s.items(), key=lambda kv: key(kv[0]))) for s in shards]


def _read_zero3(tag_dir: Path, tp: int, cfg: dict, src: str, step: int) -> Checkpoint:
    """ZeRO-3 keeps weights only in the flat optimizer partitions; DeepSpeed's `zero_to_fp32` gathers them,
    lazily (one tensor when touched). It reads every `*_optim_states.pt` of a folder as one TP rank's, so
    each rank gets a folder of links to its own files."""

    links = Path(tempfile.mkdtemp(prefix="cherry_zero3_"))
    try:
        shards = [_zero3_rank(tag_dir, links, r) for r in range(tp)]
    finally:  # the optimizer files are open (memory-mapped) by now; the links are no longer needed

        shutil.rmtree(links, ignore_errors=True)

    layout = shard_layout(cfg, src, tp)

    def fetch(n: str) -> torch.Tensor:
        return merge_one(layout, n, [s[n].contiguous().detach() for s in shards])

    specs = {n: (torch.float32, merged_shape([tuple(s[n].shape) for s in shards], layout(n))) for n in shards[0]}
    return Checkpoint(cfg, specs, fetch, src, step)


def _zero3_rank(tag_dir: Path, links: Path, r: int) -> dict:

    d = links / f"tp{r}"
    d.mkdir()
    for f in tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{r:02d}_*_states.pt"):
        (d / f.name).symlink_to(f.resolve())
    try:  # zero_to_fp32 reports on stdout, which a CLI keeps for its result
        with safe_load.weights_only_loads(), contextlib.redirect_stdout(sys.stderr):
            lazy = compat.zero3_fp32_state_dict(str(d))
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        # What zero_to_fp32 raises for shards it cannot use: ValueError/FileNotFoundError by design, KeyError for
        # a state dict without its keys, RuntimeError when flat partitions do not fit the shapes. A torch.load
        # failure is already a CheckpointError (weights_only_loads); anything else is a bug and keeps its traceback.
        raise CheckpointError(f"cannot read the ZeRO-3 shards of TP rank {r} in {tag_dir}: "
                              f"{str(e).strip().splitlines()[0]}") from None
    return {k: v for k, v in lazy.items() if not k.endswith("._extra_state")}


# --------------------------------------------------------------------------------------------- safetensors
def read_torch(path: str | Path) -> Checkpoint:
    """`save_consolidated` / `--output-format torch`: model.safetensors + cherry_config.json."""

    path = Path(path)
    if not (path / CONSOLIDATED_WEIGHTS).is_file() or not (path / CONSOLIDATED_CONFIG).is_file():
        raise CheckpointError(f"{path} is not a torch-format checkpoint ({CONSOLIDATED_WEIGHTS} + {CONSOLIDATED_CONFIG})")
    try:
        cfg = json.loads((path / CONSOLIDATED_CONFIG).read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / CONSOLIDATED_CONFIG} is not valid JSON: {e}") from None
    return read_safetensors(path / CONSOLIDATED_WEIGHTS, cfg, str(path))


def read_safetensors(file: Path, cfg: dict, source: str, rename: Callable[[str], str] = lambda n: n) -> Checkpoint:
    try:
        f = safe_open(str(file), framework="pt")
        names = list(f.keys())
        specs = {}
        for n in names:
            sl = f.get_slice(n)
            specs[rename(n)] = (_st_dtype(sl.get_dtype(), file), tuple(sl.get_shape()))
        step = int((f.metadata() or {}).get("step", 0))  # metadata values are strings; ours is an int
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file} (truncated or not safetensors): {str(e).splitlines()[0]}") from None
    back = {rename(n): n for n in names}
    return Checkpoint(cfg, specs, lambda n: f.get_tensor(back[n]), source, step)


def _st_dtype(s: str, file: Path | str = "") -> torch.dtype:
    by_name = {v: k for k, v in DTYPES.items()}
    if s not in by_name:
        raise CheckpointError(f"{file}: tensor dtype {s} is not one we read ({', '.join(by_name)})")
    return by_name[s]


# ---------------------------------------------------------------------------------------------- validation
def model_tensors(cfg_dict: dict) -> tuple[dict[str, tuple], list[str]]:
    """({name: shape}, [`_extra_state` names]) of the full (TP=1) model this config builds, built on the meta
    device (shapes only, no memory) in a world of one."""
    cfg = from_dict(cfg_dict)
    cfg.moee.ep_size = cfg.smoe.ep_size = 1  # a full checkpoint holds every expert
    cfg.parallel.tp = cfg.parallel.pp = 1
    own = not parallel_state.model_parallel_is_initialized()
    if own:
        distributed.init(ParallelConfig())
    elif parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("model_tensors needs a TP=1 world")
    try:
        with torch.device("meta"):
            state = build_model(cfg).state_dict()
    finally:
        if own:
            distributed.shutdown()
    extra = [k for k in state if k.endswith("._extra_state")]
    return {k: tuple(v.shape) for k, v in state.items() if k not in extra}, extra


def validate(ck: Checkpoint) -> list[str]:
    """The checkpoint's tensors are exactly those of the model its config builds (else one clear error);
    returns the `_extra_state` names that model's strict state dict also has."""
    try:
        expected, extra = model_tensors(ck.cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ck.source}: its config does not describe a model we build: {e}") from None
    missing = [n for n in expected if n not in ck.specs]
    unexpected = [n for n in ck.specs if n not in expected]
    wrong = [n for n in expected if n in ck.specs and tuple(ck.specs[n][1]) != expected[n]]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{wrong[0]} has shape {tuple(ck.specs[wrong[0]][1])}, the config's model {expected[wrong[0]]}")
        raise CheckpointError(f"{ck.source} does not match the model its config describes "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} misshapen; {what})")
    return extra
