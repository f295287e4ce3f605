"""Submit a training run to SLURM.

    cherry-submit --config PRESET_OR_YAML --run-dir DIR --nodes N   (= python -m cherry_megatron.launch.slurm submit)
        --gpus-per-node G [--tasks-per-node T] [--cpus-per-task C] [--partition P] [--time T]
        [--account A] [--launcher srun|torchrun] [--dry-run] [--set key=value ...]

Everything is checked before anything is written or submitted: the partition (it exists, has N nodes
with the CPUs and GPUs asked for), then the config at the world size the job will have (N x tasks per
node), the run dir (a different run's is refused) and the data files. The job runs in the directory the
submit ran in (relative data paths mean the same to both; the package must be installed in --python's
environment, as `make setup` or `pip install .` does). The batch script
(cherry_megatron/launch/train.sbatch, package data, filled in) is written to DIR/slurm/ and submitted; logs go to
DIR/slurm/<job name>-<job id>.out, appended across requeues. `--dry-run` prints the script instead.

Launchers: `srun` (default) starts one task per GPU (per `--tasks-per-node` on CPU-only nodes: gloo);
`torchrun` starts one task per node that runs torchrun over the node's GPUs. Either way the trainer
reads its rank from the environment (cherry_megatron.distributed).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cherry_megatron.checkpoint.run_dir import atomic_write_text
from cherry_megatron.errors import ConfigError, UserError, cli_errors

TEMPLATE = Path(__file__).resolve().with_name("train.sbatch")  # package data: found from any install


@dataclass
class Partition:
    name: str
    nodes: int
    cpus: int  # per node (the smallest node's)
    gpus: int  # per node (the smallest node's)


def partition_info(name: str) -> Partition:
    """The partition from `sinfo` (the default one when name is ""): its node count and per-node CPUs/GPUs."""
    args = ["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G"]
    out = subprocess.run(args + (["-p", name] if name else []), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise UserError(f"sinfo failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
    if not name:
        rows = [r for r in rows if r[0].endswith("*")]
        if not rows:
            raise UserError("the cluster has no default partition: give --partition")
    if not rows:
        raise UserError(f"unknown partition '{name}' (sinfo lists: {', '.join(list_partitions())})")
    nodes = {r[1]: (int(r[2]), gres_gpus(r[3])) for r in rows}
    return Partition(rows[0][0].rstrip("*"), len(nodes), min(c for c, _ in nodes.values()),
                     min(g for _, g in nodes.values()))


def list_partitions() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    return sorted({p.strip().rstrip("*") for p in out.split()})


def gres_gpus(gres: str) -> int:
    """GPUs per node from sinfo's %G: 'gpu:8', 'gpu:h100:8(S:0-1)', '(null)'."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w-]+)?:(\d+)", gres))


def check_fits(args, part: Partition) -> None:
    if args.nodes > part.nodes:
        raise UserError(f"--nodes {args.nodes} but partition '{part.name}' has {part.nodes} nodes")
    tasks = 1 if args.launcher == "torchrun" else tasks_per_node(args)
    if tasks * args.cpus_per_task > part.cpus:
        raise UserError(f"{tasks} tasks x {args.cpus_per_task} CPUs per node is more than the {part.cpus} CPUs of "
                        f"partition '{part.name}''s nodes")
    if args.gpus_per_node > part.gpus:
        raise UserError(f"--gpus-per-node {args.gpus_per_node} but partition '{part.name}''s nodes have "
                        f"{part.gpus} GPUs")


def tasks_per_node(args) -> int:
    """Training processes per node: one per GPU, or --tasks-per-node on CPU-only nodes."""
    return args.gpus_per_node or args.tasks_per_node


def check_run(args, world: int):
    """The config at the job's world size, the run dir and the data: the trainer's own start-up checks."""
    from cherry_megatron.preflight import preflight  # here: megatron and DeepSpeed load in seconds; --help need not wait

    return preflight(args.config, [o for group in args.overrides for o in group], args.run_dir, world)[0]


def render(args, cfg) -> str:
    run_dir, py = args.run_dir.resolve(), shlex.quote(str(Path(args.python).absolute()))
    sets = [o for group in args.overrides for o in group]
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    train = f"-m cherry_megatron.train --config {shlex.quote(config)} --run-dir {shlex.quote(str(run_dir))}" + \
        (" --set " + " ".join(shlex.quote(s) for s in sets) if sets else "")
    return batch_script(args, args.job_name or f"cherry-{cfg.name}", run_dir, run_dir / "slurm",
                        launch_line(args.launcher, tasks_per_node(args), py, train))


def launch_line(launcher: str, tasks: int, py: str, train: str) -> str:
    """The batch script's line that starts `py train` (a quoted interpreter, then its arguments) on every
    task of the job: srun (one task per process) or torchrun (one task per node)."""
    if launcher == "torchrun":
        # $SLURM_NODEID must be read inside each task, not in the batch shell. torchrun's agent dies of
        # SIGUSR1 (it handles TERM/INT/HUP/QUIT only): it ignores it, the trainers install their handler.
        inner = (f"trap '' USR1; exec {py} -m torch.distributed.run --nnodes $SLURM_NNODES --node_rank $SLURM_NODEID "
                 f"--nproc_per_node {tasks} --master_addr $MASTER_ADDR --master_port $MASTER_PORT {train}")
        return f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}"
    return f"srun --kill-on-bad-exit=1 {py} {train}"


def batch_script(args, job_name: str, run_dir: Path, log_dir: Path, launch: str) -> str:
    """cherry_megatron/launch/train.sbatch filled in: the job's shape and site options from `args`, the
    preemption marker looked for in `run_dir`, the log in `log_dir`, `launch` its one command."""
    threads = max(1, args.cpus_per_task // tasks_per_node(args)) if args.launcher == "torchrun" else args.cpus_per_task
    site = "".join(f"#SBATCH --{k}={v}\n" for k, v in (("partition", args.partition), ("time", args.time),
                                                         ("account", args.account)) if v)
    if args.gpus_per_node:
        site += f"#SBATCH --gpus-per-node={args.gpus_per_node}\n"
    values = {"JOB_NAME": job_name, "NODES": args.nodes,
              "TASKS_PER_NODE": 1 if args.launcher == "torchrun" else tasks_per_node(args),
              "CPUS_PER_TASK": args.cpus_per_task, "SITE": site, "RUN_DIR": shlex.quote(str(run_dir)),
              "LOG_DIR": shlex.quote(str(log_dir)), "WORKDIR": shlex.quote(str(Path.cwd())), "THREADS": threads,
              "LAUNCH": launch}
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    return text


def submit(args) -> str:
    if args.nodes < 1 or tasks_per_node(args) < 1 or args.cpus_per_task < 1:
        raise ConfigError("--nodes, --tasks-per-node (or --gpus-per-node) and --cpus-per-task must be >= 1")
    if args.launcher == "torchrun" and not args.gpus_per_node:
        raise ConfigError("--launcher torchrun starts one process per GPU: give --gpus-per-node (or use srun)")
    if shutil.which("sinfo") is not None:
        check_fits(args, partition_info(args.partition))
    elif not args.dry_run:
        raise UserError("sinfo/sbatch not found: run this on a SLURM login node (or pass --dry-run)")
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the script (--dry-run); DeepSpeed's import logs to stdout
        cfg = check_run(args, args.nodes * tasks_per_node(args))
    script = render(args, cfg)
    if args.dry_run:
        print(script, end="")
        return ""
    logs = args.run_dir.resolve() / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "train.sbatch"
    atomic_write_text(path, script)
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"sbatch refused the job: {out.stderr.strip()}")
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {path}, log {logs}/{args.job_name or f'cherry-{cfg.name}'}-{job}.out", flush=True)
    return job


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    submit_arguments(sub.add_parser("submit", help="check, write and submit the batch script"))
    return p.parse_args(argv)


def submit_arguments(s: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s.add_argument("--config", required=True)
    s.add_argument("--run-dir", type=Path, required=True, help="on a filesystem every node sees")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True, help="0 on CPU-only nodes (gloo)")
    s.add_argument("--tasks-per-node", type=int, default=1, help="processes per CPU-only node")
    s.add_argument("--cpus-per-task", type=int, default=8)
    s.add_argument("--partition", default="")
    s.add_argument("--time", default="", help="SLURM time limit, e.g. 2-00:00:00")
    s.add_argument("--account", default="")
    s.add_argument("--job-name", default="")
    s.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    s.add_argument("--python", default=sys.executable, help="the interpreter on the compute nodes")
    s.add_argument("--dry-run", action="store_true", help="check and print the script; submit nothing")
    s.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    return s


def main(argv=None) -> str:
    args = parse_args(argv)
    with cli_errors():
        return submit(args)


def submit_main(argv=None) -> str:
    """`cherry-submit ARGS` = `python -m cherry_megatron.launch.slurm submit ARGS`."""
    p = submit_arguments(argparse.ArgumentParser(description="Check, write and submit a training run's batch script."))
    args = p.parse_args(argv)
    with cli_errors():
        return submit(args)


if __name__ == "__main__":
    main()
