"""One writer per run dir: global rank 0 holds `RUN_DIR/.lock` for the whole run, so a second trainer on it
(a resubmit while a requeued job still runs) is refused instead of interleaving metrics and checkpoints.

The lock is a JSON lease (host, pid, SLURM job and restart count, start time, a heartbeat a daemon thread
refreshes) plus an `flock` on the same file. A held flock means a live holder where flock works (local
disks, NFS/Lustre clients that forward locks); where it is a no-op or fails, the lease alone decides.
A lease is stale, and taken over with a warning, when its host is ours and its pid is dead (or it had
the flock and we got it: the pid was reused), when it is this SLURM job at an earlier restart (a
requeue's dead predecessor), or when another host's heartbeat is older than `stale_after`.
Known gap: without a working flock, two starts that find one stale lease at the same instant both win.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from cherry_megatron.errors import CheckpointError

RECORD = 512  # fixed size: a heartbeat rewrites the same bytes, so a racing reader never sees a short file


def _identity() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "token": uuid.uuid4().hex,
            "started": now, "beat": now}


def _flock(fd: int) -> Optional[bool]:
    """True: ours; False: another open file holds it; None: this filesystem cannot say."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _read(fd: int) -> Optional[dict]:
    for _ in range(3):  # a read torn by a heartbeat in flight (NFS) parses on the next try
        try:
            lease = json.loads(os.pread(fd, 1 << 16, 0))
            if isinstance(lease["host"], str) and isinstance(lease["pid"], int) and lease["beat"] > 0:
                return lease
        except (ValueError, TypeError, KeyError):
            pass
        time.sleep(0.1)
    return None


def describe(lease: dict) -> str:
    age = f"{time.time() - lease['beat']:.0f}s ago"
    if not lease["host"]:
        return f"an unreadable lease (last modified {age})"
    job = f", SLURM job {lease['job']}" if lease.get("job") else ""
    return f"host {lease['host']} pid {lease['pid']}{job} (last heartbeat {age})"


class RunLock:
    def __init__(self, run_dir: Path, interval: float = 5.0, stale_after: Optional[float] = None):
        self.path, self.interval = Path(run_dir) / ".lock", interval
        self.stale_after = 3 * interval + 15 if stale_after is None else stale_after
        self.fd: Optional[int] = None
        self.lease: dict = {}
        self._stop, self._beater = threading.Event(), threading.Thread(target=self._beat, daemon=True)

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not any(self._create() or self._take_over() for _ in range(5)):
                raise CheckpointError(f"{self.path} keeps changing hands: another start is racing this one")
        except OSError as e:
            raise CheckpointError(f"cannot lock run dir {self.path.parent}: {e}") from None
        self._beater.start()
        return self

    def _create(self) -> bool:
        # Written whole under a temp name, then linked into place: link() fails if a lease exists, also over
        # NFS (where check-then-create is not exclusive), and no reader sees a half-written lease. Heartbeats
        # then write through the held fd, not temp + os.replace: a replace would put a new, unlocked inode
        # under the name, and the next start's flock would succeed against a live holder.
        self.lease = _identity()
        tmp = self.path.with_name(f".lock.{self.lease['token']}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.lease["flock"] = _flock(fd) is True
            self._write(fd)
            try:
                os.link(tmp, self.path)
            except OSError as e:  # NFS may report a retransmitted link that worked as failed: nlink tells
                if not isinstance(e, FileExistsError) and os.fstat(fd).st_nlink != 2:
                    raise
            if os.fstat(fd).st_nlink == 2:
                self.fd, fd = fd, None
            return self.fd is not None
        finally:
            os.unlink(tmp)
            if fd is not None:
                os.close(fd)

    def _take_over(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False  # released meanwhile: create it again
        try:
            locked = _flock(fd)
            if not os.path.samestat(os.fstat(fd), os.stat(self.path)):
                return False  # released and recreated between our open and flock
            # An unreadable lease (a crash mid-write, or not ours) counts as another host's, its mtime as the
            # heartbeat: a live holder rewrites it every beat, so it is never taken over, nor a dead one kept.
            held = _read(fd) or {"host": None, "pid": None, "beat": os.fstat(fd).st_mtime}
            reason = None if locked is False else self._stale(held, locked)
            who = describe(held)
            if reason is None:
                by_age = locked is not False and held["host"] != socket.gethostname()
                wait = f"; a lease is taken over {self.stale_after:.0f}s after its last heartbeat" if by_age else ""
                raise CheckpointError(f"run dir {self.path.parent} is in use by {who}: stop it or let it end{wait}")
            print(f"warning: taking over the stale run lock of {who}: {reason}", file=sys.stderr, flush=True)
            self.lease = {**_identity(), "flock": locked is True}
            self._write(fd)
            self.fd, fd = fd, None
            return True
        except FileNotFoundError:
            return False
        finally:
            if fd is not None:
                os.close(fd)

    def _stale(self, held: dict, locked: Optional[bool]) -> Optional[str]:
        me = _identity()
        if held.get("job") and held["job"] == me["job"] and held.get("restart", 0) < me["restart"]:
            return f"it is this SLURM job's previous run (restart {held.get('restart', 0)})"
        if held["host"] == me["host"]:
            if not _pid_alive(held["pid"]):
                return f"pid {held['pid']} is not running"
            return "its process no longer holds the lock" if held.get("flock") and locked else None
        age = time.time() - held["beat"]
        return f"no heartbeat for {age:.0f}s" if age > self.stale_after else None

    def _write(self, fd: int) -> None:
        data = json.dumps(self.lease).encode().ljust(RECORD - 1) + b"\n"
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)  # other NFS clients see what is flushed, not what sits in our page cache

    def _mine(self) -> bool:
        return (_read(self.fd) or {}).get("token") == self.lease["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._mine():
                    print(f"warning: {self.path} was taken over by another start", file=sys.stderr, flush=True)
                    return
                self.lease["beat"] = time.time()
                self._write(self.fd)
            except OSError as e:  # a file-system hiccup: the next beat tries again, the run goes on
                print(f"warning: run lock heartbeat failed: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        self._beater.join()  # a beat after the close could write into whatever file reuses the fd number
        try:
            if self._mine():  # never remove the lease of whoever took ours over
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def hold(run_dir: Path, rank: int, **kwargs) -> Optional[RunLock]:
    """Rank 0 takes the lock and every rank learns the outcome: a rank that went on alone would hang in the
    next collective while rank 0 exits. Returns the lock on rank 0, None elsewhere."""

    lock, refusal, failure = None, None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir, **kwargs).acquire()
        except CheckpointError as e:
            refusal = str(e)
        except BaseException as e:  # still tell the others, or they wait in the broadcast forever
            failure, refusal = e, f"rank 0 could not take the run lock: {e!r}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if failure is not None:
        raise failure
    if refusal is not None:
        raise CheckpointError(refusal)
    return lock
