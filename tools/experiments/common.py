"""What the experiment tools share: run the real trainer for a named run, resumably."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cherry_megatron.distributed import child_env
from cherry_megatron.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def run(name: str, run_dir: Path, config: str, steps: int, sets: list[str]) -> list[dict]:
    """Train `run_dir` to `steps` steps (skipped when its final eval is logged; resumed when interrupted)."""
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if any(r.get("eval_loss") is not None and r["step"] == steps for r in rows):
        print(f"[{name}] done already", flush=True)
        return rows
    print(f"[{name}] training {steps} steps -> {run_dir}", flush=True)
    cmd = [sys.executable, "-m", "cherry_megatron.train", "--config", config, "--run-dir", str(run_dir),
           "--set", f"train.steps={steps}", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"[{name}] failed:\n{proc.stderr[-3000:]}")
    return read_metrics(run_dir)


def heldout(load: str, data: str, seq_length: int, max_tokens: int = 0, batch_size: int = 8) -> dict:
    """`cherry_megatron.evaluate`'s result ({loss, ppl, tokens}) for a checkpoint or model dir on a data prefix."""
    proc = subprocess.run([sys.executable, "-m", "cherry_megatron.evaluate", "--load", str(load), "--data", data,
                           "--seq-length", str(seq_length), "--max-tokens", str(max_tokens), "--batch-size",
                           str(batch_size)], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"evaluate {load} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def policy_runs(steps: int, sgt: list[str], reference: Path, policies, sampling) -> list[tuple[str, int, list[str]]]:
    """(name, steps, sets) of sgt-<policy>-<sampling> for every pair; excess scores against `reference`."""
    return [(f"sgt-{pol}-{mode}", steps, sgt + [f"sgt.policy={pol}", f"sgt.sampling={mode}"] +
             ([f"sgt.reference={reference}"] if pol == "excess" else [])) for pol in policies for mode in sampling]


def reproduce(commands: list[str], image: str, caption: str) -> list[str]:
    """A report's closing lines: the commands that made it, then its figure."""
    return ["", "## Reproduce", "", "```", *commands, "```", "", f"![{caption}]({image})"]


def recorded(record: Path, command: str, produce: Callable[[], dict]) -> dict:
    """A finished run's result, kept in `record` (under reports/, committed) so that an experiment longer than one
    machine's life goes on run by run on the next one: runs/ is scratch and leaves with the machine. A record that
    another command wrote is made again."""
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("command") == command:
            return saved["result"]
        print(f"[{record.stem}] recorded by another command: running it again", flush=True)
    result = produce()
    write_report(record, json.dumps({"command": command, "result": result}, indent=1) + "\n")
    return result


def write_report(path: Path, text: str) -> None:
    """The report appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def add_compression_args(p, teacher_steps: int = 150, steps: int = 100) -> None:
    """The dense teacher -> compressed recurrent model options the depth and MoEE experiments share."""
    p.add_argument("--dense-layers", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=teacher_steps)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seq-length", type=int, default=128)


def common_sets(seq_length: int) -> list[str]:
    return [f"train.seq_length={seq_length}", "train.eval_tokens=0", "train.eval_interval=25", "train.log_interval=10"]


def teacher_and_compressed(runs: Path, args) -> tuple[Path, Path, dict]:
    """(teacher run dir, compressed model dir, tools/compress_depth.py's JSON): the dense teacher trained on
    the shipped corpus, then compressed to --blocks shared blocks with SVD LoRA; both resumable."""
    teacher = runs / "teacher"
    run("teacher", teacher, "tiny", args.teacher_steps, common_sets(args.seq_length) + [
        f"model.num_layers={args.dense_layers}", f"train.save_interval={args.teacher_steps}"])
    compressed = runs / "compressed"
    if not compressed.exists():
        proc = subprocess.run([sys.executable, "tools/compress_depth.py", "--load", str(teacher), "--target-layers",
                               str(args.blocks), "--lora-rank", str(args.lora_rank), "--output", str(compressed),
                               "--eval-tokens", "0"], cwd=ROOT, env=child_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        (runs / "compress.json").write_text(proc.stdout.strip().splitlines()[-1])
    return teacher, compressed, json.loads((runs / "compress.json").read_text())
