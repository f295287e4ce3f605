"""Run a recipe's stages in order into one directory, resumably.

A stage's output is DIR/<stage>/; it is finished when DIR/<stage>/.stage.json exists, written atomically
after everything else (its settings, the fingerprints of the markers of the stages it read, and its
summary). A finished stage is skipped when its settings are the recipe's and its inputs are the ones it was
made from; it runs again when an input ran again (or was removed); it is refused (with the difference) when
its own settings changed, unless `--rerun STAGE` names it or an earlier stage: then it and every stage
after it run again from scratch. An unfinished train stage runs its
same command again, and the trainer resumes from the run dir's checkpoint; an unfinished tool stage's
partial output is removed first (the tools refuse an existing output).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from cherry_megatron.errors import ConfigError, TrainingError
from cherry_megatron.recipe import stages as kinds
from cherry_megatron.recipe.spec import Stage, diff

MARKER = ".stage.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def marker(run_dir: Path, stage: Stage) -> dict | None:
    path = run_dir / stage.name / MARKER
    return json.loads(path.read_text()) if path.exists() else None


def fingerprint(run_dir: Path, name: str) -> str:
    path = run_dir / name / MARKER
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def inputs_of(stage: Stage, run_dir: Path) -> dict:
    return {name: fingerprint(run_dir, name) for name in dict.fromkeys(stage.references())}


def plan(stages: list[Stage], run_dir: Path, until: str = "", rerun: str = "") -> list[tuple[Stage, str]]:
    """(stage, what happens to it: skip | run | rerun) for the stages up to `until`, checked before anything
    runs: a finished stage whose settings changed is an error naming the difference."""
    names = [s.name for s in stages]
    for flag, name in (("--until", until), ("--rerun", rerun)):
        if name and name not in names:
            raise ConfigError(f"{flag} {name}: no stage named '{name}' (stages: {', '.join(names)})")
    upto = stages[:names.index(until) + 1] if until else stages
    first_rerun = names.index(rerun) if rerun else len(stages)
    out, runs = [], set()
    for i, s in enumerate(upto):
        done = marker(run_dir, s)
        stale = done is not None and (any(r in runs for r in s.references()) or
                                      done.get("inputs", {}) != inputs_of(s, run_dir))
        if i >= first_rerun or (stale and done["settings"] == s.settings()):
            out.append((s, "rerun" if (run_dir / s.name).exists() else "run"))
        elif done is None:
            out.append((s, "run"))
        elif done["settings"] != s.settings():
            raise ConfigError(f"stage '{s.name}' is finished with other settings ({diff(done['settings'], s.settings())});"
                              f" give --rerun {s.name} to run it and every later stage again")
        else:
            out.append((s, "skip"))
        if out[-1][1] != "skip":
            runs.add(s.name)
    return out


def _wait_passing_signals(proc: subprocess.Popen) -> int:
    """The stage's exit code. A TERM or USR1 sent to the runner alone (`kill PID`, a scheduler's warning) is
    passed on to the stage's process as TERM (torchrun forwards TERM to its workers but dies of USR1), so a
    trainer checkpoints before the stage ends (faults.Preemption) instead of being orphaned; the runner then
    fails the stage, and a later run resumes it."""
    def forward(_signum, _frame):
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_stage(stage: Stage, run_dir: Path, env: dict | None = None, launch: tuple[str, int] | None = None) -> dict:
    out = run_dir / stage.name
    if stage.kind != "train" and out.exists():
        shutil.rmtree(out)  # a tool stopped half-way; the tools refuse an existing output
    out.mkdir(parents=True, exist_ok=True) if stage.kind in ("convert", "evaluate") else None
    logs, t0 = [], time.perf_counter()
    log_path, out_path = run_dir / f"{stage.name}.log", run_dir / f"{stage.name}.out"
    for cmd in kinds.commands(stage, run_dir, launch):
        print(f"[{stage.name}] {' '.join(cmd)}", flush=True)
        # Streamed to files as it runs (hours of a trainer's output never sit in memory), appended to
        # DIR/<stage>.log across attempts; a tool's stdout (its result line) to DIR/<stage>.out instead.
        with open(log_path, "a") as log, open(out_path, "w") as stdout:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = _wait_passing_signals(subprocess.Popen(cmd, env=env, stderr=log,
                                                          stdout=log if stage.kind == "train" else stdout))
        logs.append(out_path.read_text())
        if code != 0:
            errors = [line for line in log_path.read_text().splitlines() if line.startswith("error:")]
            raise TrainingError(f"stage '{stage.name}' failed (exit {code}): "
                                f"{errors[-1][7:] if errors else 'see ' + str(log_path)}")
    summary = kinds.summary(stage, run_dir, logs)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / MARKER, json.dumps({"settings": stage.settings(), "inputs": inputs_of(stage, run_dir),
                                            "summary": summary}, indent=1))
    return summary


def run(stages: list[Stage], run_dir: Path, until: str = "", rerun: str = "", env: dict | None = None) -> dict:
    steps = plan(stages, run_dir, until, rerun)
    run_dir.mkdir(parents=True, exist_ok=True)
    for s, action in steps:
        if action == "rerun":
            shutil.rmtree(run_dir / s.name)
        if action == "skip":
            print(f"[{s.name}] finished already: skipped", flush=True)
            continue
        run_stage(s, run_dir, env)
    return status(stages, run_dir)


def run_one(stages: list[Stage], run_dir: Path, name: str, launch: tuple[str, int] | None = None) -> None:
    """One stage, as a SLURM job of a chain runs it (recipe.chain): its inputs must be finished; finished
    itself with these settings and inputs (a requeued job that had ended), it is left as it is."""
    stage = next((s for s in stages if s.name == name), None)
    if stage is None:
        raise ConfigError(f"--stage {name}: no stage named '{name}'")
    missing = [r for r, mark in inputs_of(stage, run_dir).items() if not mark]  # no marker: not finished
    if missing:
        raise TrainingError(f"stage '{name}' reads '{missing[0]}', which is not finished")
    done = marker(run_dir, stage)
    if done and done["settings"] == stage.settings() and done.get("inputs") == inputs_of(stage, run_dir):
        print(f"[{name}] finished already: skipped", flush=True)
        return
    if done:
        shutil.rmtree(run_dir / name)
    from cherry_megatron.distributed import LAUNCHER_VARS, child_env

    # A job's batch shell carries the job's SLURM_PROCID/SLURM_NTASKS but is no task of it: srun needs those
    # (it sizes its step from them), the tools and this process's own reading of checkpoints must not take
    # them for a world to join.
    job_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    run_stage(stage, run_dir, env=job_env if launch and stage.kind == "train" else child_env(), launch=launch)


def status(stages: list[Stage], run_dir: Path) -> dict:
    """{"stages": {name: {kind, status, params, active_params, tokens, wall_s, eval_loss}}}, also in
    DIR/report.json, with DIR/report.md and DIR/report.png."""
    from cherry_megatron.recipe.report import write_report

    table = {}
    for s in stages:
        done = marker(run_dir, s)
        state = "done" if done else "partial" if (run_dir / s.name).exists() else "pending"
        summ = dict(done["summary"]) if done else {}
        if done and done["settings"] != s.settings():
            state = "changed"
        table[s.name] = {"kind": s.kind, "status": state, **{k: summ.get(k) for k in
                         ("params", "active_params", "tokens", "wall_s", "eval_loss")}}
        if "curve" in summ:
            table[s.name]["_curve"] = summ["curve"]
    result = {"stages": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in table.items()}}
    if run_dir.exists():
        _write_atomic(run_dir / "report.json", json.dumps(result, indent=1))
        write_report(run_dir, table)
    return result
