"""The SLURM launcher against a real cluster on this machine (tools/local_slurm.py: munge, slurmctld, two
slurmd nodes): submit, preempt + requeue + resume, what submit refuses, and the tiny recipe as a chain of
jobs. No mock of sbatch or srun."""
import json
import subprocess
import time

import pytest

from cherry_megatron.distributed import child_env
from cherry_megatron.faults import FAULT_ENV
from cherry_megatron.metrics import read_metrics
from conftest import ROOT, SHORT_RUN, run_recipe
from tools.local_slurm import LocalSlurm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(corpus, tmp_path_factory):
    install = subprocess.run(["bash", str(ROOT / "launchers" / "slurm" / "install_packages.sh")],
                             capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"SLURM cannot be installed here: {install.stderr.strip()[-300:]}")
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def submit(cluster, run_dir, *args, fault: str = ""):
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "cherry_megatron.launch.slurm", "submit", "--config", "tiny",
           "--run-dir", str(run_dir), "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", *args,
           "--set", *SHORT_RUN]
    # sbatch passes the submitting shell's environment on: stale rendezvous variables (as a login shell
    # that ran torchrun may hold) must not decide the tasks' ranks.
    env = child_env({"SLURM_CONF": str(cluster.conf), "PYTHONWARNINGS": "ignore", "RANK": "0", "WORLD_SIZE": "1",
                     **({FAULT_ENV: fault} if fault else {})})
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def job_id(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("submitted job ")[1].split(":")[0]


def job_state(cluster, job: str) -> tuple[str, str]:
    fields = dict(f.split("=", 1) for f in cluster.run("scontrol", "show", "job", "-o", job).stdout.split() if "=" in f)
    return fields["JobState"], fields["Reason"]


def wait_state(cluster, job: str, states: set, timeout: float = 300, reason: str = "") -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, why = job_state(cluster, job)
        if state in states and (not reason or why == reason):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_state(cluster, job)} after {timeout} s")


def log_of(run_dir) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def final_loss(run_dir) -> float:
    rows = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    return rows[max(rows)]


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, baseline, tmp_path):
    """A job of 2 tasks on 2 nodes; USR1 to its tasks (what --signal=USR1@120 sends before the time limit)
    during step 4: the run checkpoints at step 4, the batch script requeues the job, and the restart ends
    where an uninterrupted run ends. SLURM holds a requeued job ~120 s (BeginTime); the test releases it
    once it shows that."""
    run_dir = tmp_path / "run"
    job = job_id(submit(cluster, run_dir, fault="pause@4"))
    deadline = time.monotonic() + 300
    while "fault injected: pause at step 4" not in (log_of(run_dir) if (run_dir / "slurm").exists() else ""):
        assert time.monotonic() < deadline, log_of(run_dir)
        time.sleep(0.3)
    cluster.run("scancel", "--signal=USR1", job)
    wait_state(cluster, job, {"PENDING"}, reason="BeginTime")
    for _ in range(10):  # SLURM.md: an update right after the requeue fails ("already killed"); 1.5 s later it works
        time.sleep(1.5)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        if job_state(cluster, job) != ("PENDING", "BeginTime"):
            break
    assert wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", log_of(run_dir)
    log = log_of(run_dir)
    assert "world 2 = tp 1 x dp 2" in log and f"job {job} restart 0 on n[1-2]" in log
    assert "preempted (SIGUSR1 at step 4): requeueing job" in log and f"job {job} restart 1 on n[1-2]" in log
    assert "start_step=4" in log and "training exited with 0" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step6"
    assert final_loss(run_dir) == pytest.approx(final_loss(baseline), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "3"], "--nodes 3 but partition 'debug' has 2 nodes"),
    (["--tasks-per-node", "2", "--cpus-per-task", "2"], "2 tasks x 2 CPUs per node is more than the 2 CPUs"),
    (["--partition", "gpu"], "unknown partition 'gpu' (sinfo lists: debug)"),
    (["--set", "parallel.tp=2", "parallel.pp=2"], "parallel.tp=2 x parallel.pp=2 does not divide the world size 2"),
])
def test_submit_refuses_bad_input_before_anything_is_submitted(cluster, tmp_path, args, message):
    before = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    proc = submit(cluster, tmp_path / "run", *args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    assert cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before


def test_dry_run_prints_the_script_and_writes_nothing(cluster, tmp_path):
    proc = submit(cluster, tmp_path / "run", "--dry-run", "--time", "1:00:00", "--launcher", "srun")
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=1:00:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "scontrol requeue", "srun --kill-on-bad-exit=1",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1"):
        assert line in script, line
    assert "{{" not in script and not (tmp_path / "run").exists()


def release_requeued(cluster, job: str) -> None:
    """A requeued job is held ~120 s (BeginTime); SLURM.md: an update right after the requeue fails ("already
    killed"), 1.5 s later it works."""
    wait_state(cluster, job, {"PENDING"}, reason="BeginTime")
    for _ in range(10):
        time.sleep(1.5)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        if job_state(cluster, job) != ("PENDING", "BeginTime"):
            return


def test_the_recipe_as_a_chain_of_jobs_matches_the_local_run_and_a_preempted_stage_alone_requeues(
        cluster, tiny_recipe, tmp_path):
    """recipes/cherry-tiny.yaml with --slurm: one job per stage that has to run on the two nodes (moee-train at
    world 2 over both, the rest one task), each afterok on the stages it reads; dense and compressed are the
    local run's, finished (skipped: CI time). A USR1 to the uptrain job while it trains (step 3 waits for
    it, faults.stall): uptrain checkpoints and requeues; no other stage runs twice; the stage table equals
    the local run's."""
    import shutil

    run_dir = tmp_path / "chain"
    for name in ("dense", "compressed"):
        shutil.copytree(tiny_recipe[0] / name, run_dir / name)
    env = {"SLURM_CONF": str(cluster.conf), FAULT_ENV: "pause@3"}
    proc = run_recipe(run_dir, "--slurm", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", env=env,
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]
    assert list(jobs) == list(tiny_recipe[1])[2:] and json.loads((run_dir / "slurm" / "jobs.json").read_text()) == jobs
    assert "dense" not in jobs and "compressed" not in jobs  # finished: not submitted
    assert f"[branch-ko] submitted job {jobs['branch-ko']} after {jobs['uptrain']}" in proc.stderr
    log = run_dir / "uptrain.log"
    deadline = time.monotonic() + 600
    while "fault injected: pause at step 3" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and job_state(cluster, jobs["uptrain"])[0] != "FAILED", \
            log.read_text()[-3000:] if log.exists() else "no uptrain.log"
        time.sleep(0.3)
    cluster.run("scancel", "--signal=USR1", jobs["uptrain"])
    release_requeued(cluster, jobs["uptrain"])
    for name, job in jobs.items():
        assert wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900) == "COMPLETED", \
            (name, (run_dir / f"{name}.log").read_text()[-3000:] if (run_dir / f"{name}.log").exists() else "")
    outs = {name: "".join(p.read_text() for p in (run_dir / "slurm").glob(f"cherry-tiny-{name}-{job}.out"))
            for name, job in jobs.items()}
    assert "preempted (SIGUSR1 at step 3): requeueing job" in outs["uptrain"]
    assert f"job {jobs['uptrain']} restart 1" in outs["uptrain"] and "start_step=3" in log.read_text()  # its preemption checkpoint
    for name, out in outs.items():  # every other stage ran once
        assert out.count(" restart ") == (2 if name == "uptrain" else 1), (name, out)
    assert "world 2 = tp 1 x dp 2" in (run_dir / "moee-train.log").read_text() and "on n[1-2]" in outs["moee-train"]
    final = run_recipe(run_dir, command="status")
    assert final.returncode == 0, final.stderr[-2000:]
    stages = json.loads(final.stdout.strip().splitlines()[-1])["stages"]
    assert {n: r["status"] for n, r in stages.items()} == {n: "done" for n in stages}
    for name, r in tiny_recipe[1].items():
        assert stages[name]["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-6), name
        assert (stages[name]["params"], stages[name]["tokens"]) == (r["params"], r["tokens"]), name
