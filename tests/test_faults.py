"""Faults a cluster run meets, on real processes: a preemption signal to one rank, kill -9 of a rank, a crash
in the middle of a checkpoint write, non-finite losses and a hung step. Faults are injected through
CHERRY_FAULT_INJECT (cherry_megatron/faults.py); every run is the real trainer."""
import os
import signal
import subprocess
import sys
import time

import pytest

from cherry_megatron.distributed import child_env
from cherry_megatron.faults import FAULT_ENV, REQUEUE_EXIT_CODE
from cherry_megatron.metrics import read_metrics
from conftest import ROOT, SHORT_RUN, error_lines, run_cli, train

pytestmark = pytest.mark.slow


def final(run_dir) -> dict:
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    return rows[max(rows)]


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def launch(run_dir, fault: str, log, sets=()) -> subprocess.Popen:
    """2 ranks under torchrun, in the background; stderr goes to the file `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cherry_megatron.train", "--config", "tiny", "--run-dir", str(run_dir), "--set", *SHORT_RUN, *sets]
    env = child_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", FAULT_ENV: fault})
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True)


def wait_for(log, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"'{text}' never appeared")


def workers(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_preempted_then_killed_rank_resumes_to_the_uninterrupted_result(baseline, tmp_path):
    """SIGUSR1 to one of 2 ranks during step 4: both agree, checkpoint at step 4 (not a save step) and exit
    with the requeue code. Relaunched, one rank is killed with SIGKILL while step 5 hangs: the next
    launch resumes from step 4 and ends with the uninterrupted run's loss."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = launch(run_dir, "pause@4", log)
    wait_for(log, "fault injected: pause at step 4", proc)
    os.kill(workers(proc)[1], signal.SIGUSR1)
    proc.wait(timeout=300)
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in log.read_text(), log.read_text()[-3000:]
    assert latest(run_dir) == "global_step4"
    assert any(r.get("preempted") == 1 and r["step"] == 4 for r in read_metrics(run_dir))

    proc = launch(run_dir, "hang@5", log, sets=["train.step_timeout_s=0"])
    wait_for(log, "fault injected: hang at step 5", proc)
    os.kill(workers(proc)[0], signal.SIGKILL)
    proc.wait(timeout=300)
    assert proc.returncode != 0 and latest(run_dir) == "global_step4"

    train(run_dir, nproc=2)
    assert final(run_dir)["step"] == 6
    assert final(run_dir)["loss"] == pytest.approx(final(baseline)["loss"], rel=1e-5)


def test_crash_in_the_middle_of_a_checkpoint_write_resumes_from_the_previous_one(baseline, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["-m", "cherry_megatron.train", "--config", "tiny", "--run-dir", str(run_dir), "--set", *SHORT_RUN],
                   env={FAULT_ENV: "crash_in_save@6"})
    assert proc.returncode == 1 and "fault injected: crash after writing" in proc.stderr, proc.stderr[-3000:]
    assert latest(run_dir) == "global_step3" and (run_dir / "checkpoints" / "global_step6").is_dir()
    before = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    proc = train(run_dir)
    assert "start_step=3" in proc.stdout
    assert final(run_dir)["loss"] == pytest.approx(final(baseline)["loss"], rel=1e-6)
    # Steps 4-6 ran twice; metrics.jsonl holds each once, the resumed attempt's (its rows past step 3 were dropped)
    assert before == [1, 2, 3, 4, 5, 6] and [r["step"] for r in read_metrics(run_dir) if "loss" in r] == before
    assert [r["step"] for r in read_metrics(run_dir) if "eval_loss" in r] == [0, 3, 6]


def test_non_finite_losses_skip_their_updates_then_stop_the_run(corpus, tmp_path):
    """NaN at steps 2, 4 and 5 with train.max_nan_steps=2: step 2's update is skipped (step 3's loss is
    finite, so the weights are), and the second NaN in a row stops the run with one error line."""
    proc = run_cli(["-m", "cherry_megatron.train", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--set",
                    *SHORT_RUN, "train.max_nan_steps=2"], env={FAULT_ENV: "nan_loss@2,nan_loss@4,nan_loss@5"})
    assert proc.returncode == 3  # a run that failed (errors.TrainingError), not bad input (2)
    assert error_lines(proc) == ["error: 2 steps in a row had a non-finite loss (train.max_nan_steps=2), last at step "
                                 "5; their updates were skipped, the last checkpoint is step 3: lower train.lr or "
                                 "check the data"]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r.get("skipped_step")] == [2, 4, 5]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 3] and all(v == v and v < 20 for v in losses.values())


def test_a_hung_step_dumps_stacks_and_exits(corpus, tmp_path):
    start = time.monotonic()
    proc = run_cli(["-m", "cherry_megatron.train", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--set",
                    *SHORT_RUN, "train.step_timeout_s=2", "train.collective_timeout_s=1"], env={FAULT_ENV: "hang@2"})
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert "Timeout (0:00:02)!" in proc.stderr and "in fit" in proc.stderr, proc.stderr[-2000:]
