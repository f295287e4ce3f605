"""recipes/cherry-tiny.yaml end to end through the real tools at a test budget (conftest.RECIPE_SHORT): every
stage finished with its figures, a second run skips all of them, and a run killed (SIGKILL, runner and
stages together) inside the uptrain stage ends, when run again, where the uninterrupted run ends."""
import json
import math
import os
import shutil
import signal
import time

import pytest

from cherry_megatron.faults import FAULT_ENV
from conftest import run_recipe

pytestmark = pytest.mark.slow

STAGES = ["dense", "compressed", "uptrain", "branch-ko", "branch-en", "moee", "moee-train", "evaluate"]


def table(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["stages"]


def losses(stages: dict) -> dict:
    return {name: r["eval_loss"] for name, r in stages.items()}


def test_the_tiny_recipe_runs_every_stage_and_a_second_run_skips_them_all(tiny_recipe):
    run_dir, stages = tiny_recipe
    assert list(stages) == STAGES and {r["status"] for r in stages.values()} == {"done"}, stages
    for name in ("dense", "uptrain", "branch-ko", "branch-en", "moee-train"):
        r = stages[name]
        assert r["kind"] == "train" and r["tokens"] == 4 * 4 * 64 and math.isfinite(r["eval_loss"]), (name, r)
    assert stages["compressed"]["params"] < stages["dense"]["params"]  # 4 layers -> 2 shared blocks + LoRA
    assert stages["moee-train"]["active_params"] < stages["moee-train"]["params"]  # top-1 of two experts
    assert stages["uptrain"]["eval_loss"] < stages["compressed"]["eval_loss"]  # distilled from the dense model
    evaluated = stages["evaluate"]["eval_loss"]
    assert list(evaluated) == ["dense", "compressed", "uptrain", "branch-ko", "branch-en", "moee-train"]
    assert all(math.isfinite(v) for v in evaluated.values())
    assert json.loads((run_dir / "report.json").read_text())["stages"] == stages
    assert "| moee-train | train | done |" in (run_dir / "report.md").read_text() and (run_dir / "report.png").exists()
    logs = {p.name: p.stat().st_size for p in run_dir.glob("*.log")}

    again = run_recipe(run_dir)
    assert table(again) == stages
    assert [f"[{n}] finished already: skipped" in again.stderr for n in STAGES] == [True] * len(STAGES), again.stderr
    assert {p.name: p.stat().st_size for p in run_dir.glob("*.log")} == logs  # nothing ran


def test_a_run_killed_inside_uptrain_resumes_to_the_uninterrupted_figures(tiny_recipe, tmp_path):
    reference, expected = tiny_recipe
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    for name in ("dense", "compressed"):  # finished as in the reference (markers and all): skipped here
        shutil.copytree(reference / name, run_dir / name)
    # Step 3 of each training stage waits 5 s (faults.stall): the kill lands inside uptrain, after its step-2
    # checkpoint, whatever the load.
    proc = run_recipe(run_dir, env={FAULT_ENV: "pause@3"}, popen=True)
    log = run_dir / "uptrain.log"
    deadline = time.monotonic() + 600
    try:
        while "fault injected: pause at step 3" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (run_dir / "uptrain" / "checkpoints" / "latest").read_text().strip() == "global_step2"
    assert not (run_dir / "uptrain" / ".stage.json").exists() and not (run_dir / "branch-ko").exists()

    status = table(run_recipe(run_dir, command="status"))
    assert status["uptrain"]["status"] == "partial" and status["dense"]["status"] == "done"
    resumed = run_recipe(run_dir)
    final = table(resumed)
    assert "[uptrain] finished already" not in resumed.stderr and "[compressed] finished already" in resumed.stderr
    assert "start_step=2" in log.read_text()
    assert {n: r["status"] for n, r in final.items()} == {n: "done" for n in STAGES}
    got, want = losses(final), losses(expected)
    for name in STAGES:  # evaluate's is a {model: loss} mapping
        assert got[name] == pytest.approx(want[name], rel=1e-6), name



def test_a_term_to_the_runner_alone_checkpoints_the_running_stage_and_leaves_no_orphan(corpus, tmp_path):
    """`kill PID` of the runner (not its group): the trainer gets TERM (faults.Preemption), checkpoints the step
    it is in and exits; the runner fails with one error line; the next run resumes the stage there."""
    import subprocess
    import sys

    from cherry_megatron.distributed import child_env
    from conftest import ROOT, SHORT_RUN

    recipe = tmp_path / "one.yaml"
    recipe.write_text("- name: dense\n  kind: train\n  config: tiny\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cherry_megatron.recipe", "run", "--recipe", str(recipe), "--run-dir", str(run_dir),
           "--set", *SHORT_RUN]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env({"OMP_NUM_THREADS": "1", FAULT_ENV: "pause@4"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run_dir / "dense.log"
    deadline = time.monotonic() + 300
    try:
        while "fault injected: pause at step 4" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "stage 'dense' failed" in errors[0], err[-3000:]
    assert (run_dir / "dense" / "checkpoints" / "latest").read_text().strip() == "global_step4"
    assert subprocess.run(["pgrep", "-f", str(run_dir / "dense")], capture_output=True).stdout == b""  # no orphan
    again = subprocess.run(cmd, cwd=ROOT, env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "start_step=4" in log.read_text() and json.loads(again.stdout.splitlines()[-1])["stages"]["dense"]["status"] == "done"
