"""Shared fixtures: the shipped corpus (built by `make data`) and a runner for real CLI processes.

Multi-process tests launch the real trainer under torchrun with gloo: no mocked torch.distributed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

# A short run of a 2-layer tiny model: small enough that process start-up dominates.
SHORT_RUN = ["model.num_layers=2", "train.steps=6", "train.micro_batch_size=2", "train.global_batch_size=4",
             "train.seq_length=64", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=3",
             "train.save_interval=3", "train.eval_tokens=1024"]


@pytest.fixture(scope="session")
def corpus():
    if not (DATA / ".built").exists():
        pytest.fail("the shipped corpus is missing: run `make data` (make test does it)")
    return SimpleNamespace(tokenizer=DATA / "tokenizer" / "cherry_ko8k.model",
                           train=DATA / "tokens" / "train_text_document",
                           heldout=DATA / "tokens" / "heldout_text_document",
                           corpus=DATA / "corpus")


@pytest.fixture(scope="session")
def baseline(corpus, tmp_path_factory):
    """The SHORT_RUN tiny model at TP=1, DP=1, one process: the curve many tests compare against (read only)."""
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    train(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def zero3_tp2(corpus, tmp_path_factory):
    """The SHORT_RUN at TP=2 x DP=2 under ZeRO-3 (weights only in the optimizer shards): a training-layout
    test (test_train) and the conversion chain's source (test_convert)."""
    run_dir = tmp_path_factory.mktemp("runs") / "zero3_tp2"
    train(run_dir, ["parallel.zero_stage=3", "parallel.tp=2"], nproc=4)
    return run_dir


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` (under torchrun when nproc > 1) from the repo root."""
    # In-process fixtures (world_of_one) export RANK/MASTER_PORT...; a child must find its own world.
    from cherry_megatron.distributed import child_env

    # Several processes share the 2 cores: one thread each. One process: the cores it may use (no OMP_NUM_THREADS,
    # which the trainer would respect).
    full_env = child_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})})
    if nproc == 1 and "OMP_NUM_THREADS" not in (env or {}):
        del full_env["OMP_NUM_THREADS"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        args = ["-m", *args] if args[0] != "-m" else args
    else:
        cmd = [sys.executable]
    return subprocess.run(cmd + args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, sets: list[str] = (), nproc: int = 1, config: str = "tiny", check: bool = True,
          short: bool = True):
    args = ["-m", "cherry_megatron.train", "--config", config, "--run-dir", str(run_dir),
            "--set", *(SHORT_RUN if short else []), *sets]
    if nproc > 1:
        args = args[1:]
    proc = run_cli(args, nproc=nproc)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def world_of_one():
    """This process as a world of one (TP=1) for in-process model tests."""
    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig

    distributed.init(ParallelConfig(tp=1))
    yield
    distributed.shutdown()


# The tiny recipe at a test budget: 4 steps a training stage (a checkpoint at 2), 1,024 tokens per evaluation.
RECIPE_SHORT = ["train.steps=4", "train.warmup_steps=1", "train.save_interval=2", "train.eval_interval=2",
                "train.log_interval=1", "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
                "train.eval_tokens=1024", "compressed:eval-tokens=1024", "moee:eval-tokens=1024",
                "evaluate:max-tokens=1024"]


def run_recipe(run_dir: Path, *args: str, env: dict | None = None, timeout: int = 900, popen: bool = False,
               command: str = "run"):
    """`python -m cherry_megatron.recipe run` (or `command`) of recipes/cherry-tiny.yaml at RECIPE_SHORT (popen:
    started, not waited for, in its own session, so a test can kill the runner and its stages together)."""
    from cherry_megatron.distributed import child_env

    cmd = [sys.executable, "-m", "cherry_megatron.recipe", command, "--recipe", "recipes/cherry-tiny.yaml",
           "--run-dir", str(run_dir), *args, "--set", *RECIPE_SHORT]
    full_env = child_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})})
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_recipe(corpus, tmp_path_factory):
    """recipes/cherry-tiny.yaml run uninterrupted at RECIPE_SHORT: (run dir, its final stage table)."""
    import json

    if not (DATA / "tokens" / "train_ko_text_document.bin").exists():
        pytest.fail("the per-language splits are missing: run `make branches` (make test does it)")
    run_dir = tmp_path_factory.mktemp("recipe") / "tiny"
    proc = run_recipe(run_dir)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dir, json.loads(proc.stdout.strip().splitlines()[-1])["stages"]
