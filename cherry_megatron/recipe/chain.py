"""A recipe as a chain of SLURM jobs: one job per stage that has to run, each `afterok` on the jobs of the
stages it reads (so independent branches may run side by side).

Every job is the launcher's batch script (cherry_megatron/launch/train.sbatch) whose one command is
`python -m cherry_megatron.recipe stage ...`: that stage alone, exactly as the local runner runs it (inputs
resolved when the job starts, the marker written last), a training stage's trainer started by srun (or
torchrun) over the job's tasks. A training stage preempted (USR1 before the time limit, `scancel
--signal=USR1`) checkpoints and its job requeues itself: the jobs after it keep waiting on it, the stages
before it are finished, so only that stage runs again, from its checkpoint.

Shape: a training stage's world size is its `nproc` on SLURM too (so a chain reproduces a local run),
over min(--nodes, nproc) nodes with nproc / nodes tasks each (one GPU per task where --gpus-per-node is
given); every other stage is one task on one node. Logs: DIR/slurm/<recipe>-<stage>-<job>.out, job ids in
DIR/slurm/jobs.json.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from cherry_megatron.checkpoint.run_dir import atomic_write_text
from cherry_megatron.errors import ConfigError, UserError
from cherry_megatron.launch import slurm
from cherry_megatron.recipe.spec import Stage


def shape(stage: Stage, opts) -> SimpleNamespace:
    """The job's shape, in the launcher's terms (`slurm.check_fits`, `slurm.batch_script`)."""
    world = stage.nproc if stage.kind == "train" else 1
    nodes = min(opts.nodes, world)
    if world % nodes:
        raise ConfigError(f"stage '{stage.name}': nproc {world} does not spread evenly over {nodes} nodes "
                          f"(--nodes {opts.nodes})")
    tasks = world // nodes
    if opts.gpus_per_node and tasks > opts.gpus_per_node:
        raise ConfigError(f"stage '{stage.name}': nproc {world} needs {tasks} GPUs on each of {nodes} nodes, "
                          f"more than --gpus-per-node {opts.gpus_per_node}")
    return SimpleNamespace(nodes=nodes, tasks_per_node=tasks, gpus_per_node=tasks if opts.gpus_per_node else 0,
                           cpus_per_task=opts.cpus_per_task, partition=opts.partition, time=opts.time,
                           account=opts.account, launcher=opts.launcher if stage.kind == "train" else "srun")


def stage_command(py: str, recipe: Path, run_dir: Path, stage: Stage, overrides: list[str], job) -> str:
    args = [py, "-m", "cherry_megatron.recipe", "stage", "--recipe", str(recipe), "--run-dir", str(run_dir),
            "--stage", stage.name, "--launcher", job.launcher, "--tasks-per-node", str(job.tasks_per_node)]
    if overrides:
        args += ["--set", *overrides]
    return " ".join(shlex.quote(a) for a in args)


def submit(name: str, steps: list[tuple[Stage, str]], run_dir: Path, recipe: Path, overrides: list[str],
           opts) -> dict[str, str]:
    """Submit the stages that are not skipped; {stage: job id}. Every job's shape is checked against the
    partition before the first is submitted; if sbatch refuses one, the ones already submitted are cancelled."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: --slurm runs on a SLURM login node")
    todo = [(s, a) for s, a in steps if a != "skip"]
    part = slurm.partition_info(opts.partition)
    shapes = {s.name: shape(s, opts) for s, _ in todo}
    for job in shapes.values():
        slurm.check_fits(job, part)
    run_dir = run_dir.resolve()
    logs = run_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    frozen = logs / f"recipe-{stamp}.yaml"  # what the jobs read, whatever happens to the recipe file meanwhile
    shutil.copyfile(recipe, frozen)
    py = shlex.quote(str(Path(opts.python).absolute()))
    jobs: dict[str, str] = {}
    try:
        for stage, action in todo:
            if action == "rerun":
                shutil.rmtree(run_dir / stage.name)
            job = shapes[stage.name]
            script = slurm.batch_script(job, f"{name}-{stage.name}", run_dir / stage.name, logs,
                                        stage_command(py, frozen, run_dir, stage, overrides, job))
            path = logs / f"{stage.name}.sbatch"
            atomic_write_text(path, script)
            after = [jobs[r] for r in dict.fromkeys(stage.references()) if r in jobs]
            cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes",
                   *([f"--dependency=afterok:{':'.join(after)}"] if after else []), str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise UserError(f"sbatch refused stage '{stage.name}': {out.stderr.strip()}")
            jobs[stage.name] = out.stdout.strip().split(";")[0]
            print(f"[{stage.name}] submitted job {jobs[stage.name]}"
                  f"{' after ' + ', '.join(after) if after else ''}: {path}", flush=True)
    except BaseException:
        if jobs:
            subprocess.run(["scancel", *jobs.values()], capture_output=True, timeout=60)
        raise
    atomic_write_text(logs / "jobs.json", json.dumps(jobs, indent=1))
    return jobs
