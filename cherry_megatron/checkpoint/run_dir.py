"""The run directory: the resolved config a run was started with, and where its checkpoints are.

A run directory is one run. Restarting with it resumes; restarting with a config that differs in
anything but the keys in `RESUMABLE_KEYS` is refused, because the checkpoint and the data order
belong to the original config.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from cherry_megatron.config import RESUMABLE_KEYS, Config, flatten, to_yaml
from cherry_megatron.errors import ConfigError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_diffs(saved: dict, wanted: dict, free=lambda k: False) -> list[str]:
    return [k for k in sorted(set(saved) | set(wanted))
            if k not in RESUMABLE_KEYS and not free(k) and saved.get(k) != wanted.get(k)]


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse a run dir that holds a different run."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
    except yaml.YAMLError:
        raise ConfigError(f"{saved_path} is not valid YAML; the run directory is damaged") from None
    wanted = flatten(cfg.to_dict())
    diffs = config_diffs(saved, wanted)
    if diffs:
        k = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(f"run dir {run_dir} holds a run with {k}={saved.get(k)!r}, requested {wanted.get(k)!r}{more}; "
                          f"use a new --run-dir or the saved config")


def write_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """DeepSpeed writes `latest` after a checkpoint's files, so it names only a complete checkpoint."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None
