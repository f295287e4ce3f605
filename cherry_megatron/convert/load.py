"""Any checkpoint in, as one full state dict or as a built model: what every tool that loads a model calls.

Formats are told apart by their files: a torch-format dir (`save_consolidated`, `--output-format torch`),
a Hugging Face Llama or JetMoe dir, or a DeepSpeed checkpoint (run dir, checkpoints/ or tag dir) at any TP/PP/ZeRO
stage. The readers never unpickle code (convert/safe_load.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cherry_megatron.checkpoint.consolidate import CONSOLIDATED_CONFIG, CONSOLIDATED_WEIGHTS, build_loaded
from cherry_megatron.config import Config, from_dict
from cherry_megatron.convert.checkpoint import Checkpoint, read_deepspeed, read_torch
from cherry_megatron.convert.hf_import import read_hf


def read_any(path: str | Path) -> Checkpoint:
    path = Path(path)
    if (path / CONSOLIDATED_WEIGHTS).is_file() and (path / CONSOLIDATED_CONFIG).is_file():
        return read_torch(path)
    if (path / "config.json").is_file() and list(path.glob("model*.safetensors")):
        return read_hf(path)
    return read_deepspeed(path)


def load_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 state dict, the run's config dict) of the checkpoint at `path`."""
    ck = read_any(path)
    return {name: ck.get(name).float() for name in ck.specs}, ck.cfg


def load_model(path: str | Path) -> tuple[torch.nn.Module, Config]:
    """(model in eval mode, its config): the checkpoint at `path` built and loaded into this rank's TP slice.
    Every rank keeps every expert of a routed model (the full state holds them all: moee.ep_size=1)."""
    state, cfg_dict = load_consolidated(path)
    cfg = from_dict(cfg_dict)
    cfg.moee.ep_size = cfg.smoe.ep_size = 1
    return build_loaded(cfg, state, str(path)), cfg


ARCHITECTURE = ("model", "recurrent", "moee", "smoe")


def checkpoint_layer(path: Path) -> dict:
    """The config layer a checkpoint directory stands for: its architecture sections, its tokenizer, and
    `model.init_from` pointing at it. The checkpoint's parallel layout and training settings are not taken:
    a run starting from a published model picks its own (`parallel.*`, `train.*`, `moee.ep_size`)."""
    from cherry_megatron.errors import ConfigError, UserError

    try:
        ck = read_any(path).cfg
    except UserError as e:
        raise ConfigError(f"--config {path} is a directory but not a checkpoint we read: {e}") from None
    layer = {k: dict(ck.get(k, {})) for k in ARCHITECTURE}  # a checkpoint older than a section has its defaults
    layer["model"]["init_from"] = str(path)
    layer["moee"].pop("ep_size", None)
    layer["smoe"].pop("ep_size", None)
    layer["recurrent"].pop("exit_loss_weights", None)  # a training objective, not the architecture
    layer["name"] = path.resolve().name
    tokenizer = ck.get("data", {}).get("tokenizer_model", "")
    if tokenizer:
        layer["data"] = {"tokenizer_model": tokenizer}
    return layer
