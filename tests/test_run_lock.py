"""One run dir, one writer: the lease + flock of cherry_megatron/checkpoint/run_lock.py, in process and on real
trainers (a second trainer on a run dir in use is refused at 2 ranks; a kill -9'd holder is taken over)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from cherry_megatron.checkpoint.run_lock import RunLock
from cherry_megatron.distributed import LAUNCHER_VARS, child_env
from cherry_megatron.errors import CheckpointError
from cherry_megatron.metrics import read_metrics
from conftest import ROOT, SHORT_RUN, train


def write_lease(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "restart": 0, "token": "theirs",
             "started": time.time(), "beat": time.time(), **fields}
    (run_dir / ".lock").write_text(json.dumps(lease))


def lease(run_dir) -> dict:
    return json.loads((run_dir / ".lock").read_text())


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_second_acquire_is_refused_naming_the_holder_and_release_removes_the_lease(tmp_path):
    lock = RunLock(tmp_path, interval=0.1).acquire()
    held = lease(tmp_path)
    assert (held["host"], held["pid"], held["flock"]) == (socket.gethostname(), os.getpid(), True)
    with pytest.raises(CheckpointError, match=f"in use by host {re.escape(socket.gethostname())} pid {os.getpid()} "
                                              r"\(last heartbeat \d+s ago\): stop it or let it end$"):
        RunLock(tmp_path).acquire()
    time.sleep(0.5)
    assert lease(tmp_path)["beat"] > held["beat"]  # the heartbeat thread refreshes it
    lock.release()
    assert list(tmp_path.iterdir()) == []  # no lease, no temp file
    RunLock(tmp_path).acquire().release()


def test_release_leaves_the_lease_of_whoever_took_it_over(tmp_path):
    lock = RunLock(tmp_path, interval=60).acquire()
    with open(tmp_path / ".lock", "r+") as f:  # in place, as a takeover writes it
        f.write(json.dumps({**lease(tmp_path), "token": "theirs"}).ljust(511) + "\n")
    lock.release()
    assert lease(tmp_path)["token"] == "theirs"


def test_a_lease_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lease(tmp_path, pid=pid)
    lock = RunLock(tmp_path).acquire()
    err = capsys.readouterr().err.splitlines()
    host = re.escape(socket.gethostname())
    assert len(err) == 1 and re.fullmatch(f"warning: taking over the stale run lock of host {host} pid {pid} "
                                          f"\\(last heartbeat \\ds ago\\): pid {pid} is not running", err[0])
    assert lease(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_a_held_flock_refuses_whatever_the_lease_says(tmp_path):
    """The lease names a dead pid, but a live process holds the file's flock: that process is the holder."""
    write_lease(tmp_path, pid=dead_pid())
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(tmp_path / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(CheckpointError, match="in use by") as e:
            RunLock(tmp_path, stale_after=0).acquire()
        assert "taken over" not in str(e.value)  # a held flock is never stale
    finally:
        holder.communicate("")
    RunLock(tmp_path).acquire().release()  # its flock gone, the dead pid decides


def test_another_hosts_lease_is_taken_over_once_its_heartbeat_is_old(tmp_path, capsys):
    write_lease(tmp_path, host="node-b", pid=4242, job="77")
    with pytest.raises(CheckpointError) as e:
        RunLock(tmp_path, stale_after=2).acquire()
    assert re.fullmatch(f"run dir {re.escape(str(tmp_path))} is in use by host node-b pid 4242, SLURM job 77 "
                        r"\(last heartbeat \ds ago\): stop it or let it end; a lease is taken over 2s after its "
                        "last heartbeat", str(e.value)), str(e.value)
    write_lease(tmp_path, host="node-b", pid=4242, job="77", beat=time.time() - 5)
    RunLock(tmp_path, stale_after=2).acquire().release()
    assert capsys.readouterr().err.endswith(": no heartbeat for 5s\n")


def test_the_previous_incarnation_of_a_requeued_job_is_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lease(tmp_path, host="node-b", job="77", restart=1)  # another step of this same allocation: alive
    with pytest.raises(CheckpointError, match="in use by host node-b"):
        RunLock(tmp_path).acquire()
    write_lease(tmp_path, host="node-b", job="77", restart=0)
    RunLock(tmp_path).acquire().release()
    assert "it is this SLURM job's previous run (restart 0)" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b'{"host": "node-b", "pid": 12', b"\0" * 512, b'["not", "a", "lease"]'])
def test_an_unreadable_lease_counts_as_alive_until_its_mtime_is_old(tmp_path, content, capsys):
    """A lease that does not parse (a crash mid-write, a disk full, not ours) names no host or pid to check; its
    mtime stands in for the heartbeat, as for another host: a live holder rewrites the file every beat, so it
    is never taken over, and a dead one's file ages out."""
    (tmp_path / ".lock").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"in use by an unreadable lease \(last modified \ds ago\)"):
        RunLock(tmp_path, stale_after=2).acquire()
    os.utime(tmp_path / ".lock", (time.time() - 10,) * 2)
    RunLock(tmp_path, stale_after=2).acquire().release()
    assert "taking over the stale run lock of an unreadable lease" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_a_locked_run_dir_with_one_error_line(corpus, tmp_path, capsys):
    """In process (the CLI's own main, a world of one): exit 2, one line naming the holder, nothing written."""
    from cherry_megatron.train import main

    run_dir, added = tmp_path / "run", [k for k in LAUNCHER_VARS if k not in os.environ]
    lock = RunLock(run_dir).acquire()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["--config", "tiny", "--run-dir", str(run_dir), "--set", *SHORT_RUN])
    finally:
        lock.release()
        for k in added:  # the world of one main() joined exported these; later children must not inherit them
            os.environ.pop(k, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(lines) == 1 and f"pid {os.getpid()} " in lines[0], lines
    assert list(run_dir.iterdir()) == []


# -- real trainers -----------------------------------------------------------------------------------------

def start(run_dir, log, env=None) -> subprocess.Popen:
    """One trainer process in the background, with run_cli's environment; stderr goes to the file `log`."""
    cmd = [sys.executable, "-m", "cherry_megatron.train", "--config", "tiny", "--run-dir", str(run_dir),
           "--set", *SHORT_RUN]
    env = child_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})})
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def start_world(run_dir, logs) -> list:
    """One process per rank with the rendezvous variables set, as srun starts tasks: unlike torchrun, nothing
    kills the other ranks when one exits, so a rank that never learns of rank 0's refusal would hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = {"WORLD_SIZE": str(len(logs)), "LOCAL_WORLD_SIZE": str(len(logs)), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}
    return [start(run_dir, log, {**world, "RANK": str(r), "LOCAL_RANK": str(r)}) for r, log in enumerate(logs)]


def wait_for_lease(run_dir, proc: subprocess.Popen, log, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return lease(run_dir)
        except (FileNotFoundError, ValueError):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
    raise AssertionError(f"no lease after {timeout} s")


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def losses(run_dir) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_a_second_trainer_on_a_run_dir_in_use_is_refused_and_the_first_is_untouched(baseline, tmp_path):
    """The first trainer is stopped (SIGSTOP) once it holds the lease, so the second meets it alive under any
    machine load, and the run dir cannot change under the comparison. The second runs at 2 ranks: rank 0
    decides, and both must leave with the refusal instead of rank 1 waiting in a collective."""
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = start(run_dir, log)
    assert wait_for_lease(run_dir, first, log)["pid"] == first.pid
    os.kill(first.pid, signal.SIGSTOP)
    try:
        before = snapshot(run_dir)
        logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
        world = start_world(run_dir, logs)
        try:
            ranks = [p.wait(timeout=300) for p in world]  # within bounded time: no rank waits for a peer
        finally:
            for p in world:
                if p.poll() is None:
                    p.kill()
        assert snapshot(run_dir) == before  # nothing written, not even the lease touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stderr = [log.read_text() for log in logs]
    assert ranks == [2, 2], stderr
    lines = [line for err in stderr for line in err.splitlines() if line.startswith("error: ")]
    holder = f"is in use by host {socket.gethostname()} pid {first.pid} "
    assert len(lines) == 1 and holder in lines[0] and "Traceback" not in "".join(stderr), stderr
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert losses(run_dir) == losses(baseline) and len(losses(run_dir)) == 6  # one writer: no doubled steps
    assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_the_lease_of_a_killed_trainer_is_taken_over(corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = start(run_dir, log)
    wait_for_lease(run_dir, first, log)
    os.kill(first.pid, signal.SIGKILL)  # as soon as it holds the lease: one process, no children yet
    first.wait(timeout=60)
    assert (run_dir / ".lock").exists()
    proc = train(run_dir)
    warnings = [line for line in proc.stderr.splitlines() if "run lock" in line]
    holder = f"warning: taking over the stale run lock of host {socket.gethostname()} pid {first.pid} "
    assert len(warnings) == 1 and warnings[0].startswith(holder), proc.stderr[-3000:]
    assert warnings[0].endswith(f": pid {first.pid} is not running")
    assert max(step for step, _ in losses(run_dir)) == 6
    assert not (run_dir / ".lock").exists()
