"""What a long run meets on a cluster: preemption signals, hung steps, non-finite losses, and (for tests)
faults injected on purpose.

- `Preemption`: SIGUSR1 (SLURM's `--signal=USR1@120` warning before the time limit, or `scancel
  --signal=USR1`) and SIGTERM (scancel, a node drain) only set a flag; after each step every rank agrees
  through one all-reduce, saves a checkpoint, rank 0 leaves a `preempted` marker in the run dir, and all
  exit with `REQUEUE_EXIT_CODE`. The batch script requeues the job when it finds the marker (exit codes do
  not pass through torchrun). A SIGTERM from scancel also ends the batch shell, so that job is not
  requeued, but its checkpoint is there for a resubmit. The handlers are process-wide, so they are
  installed for the run and restored after.
- `StepWatchdog`: `faulthandler.dump_traceback_later` armed around each training iteration (step, eval,
  save): one that hangs (a lost peer in a collective, a wedged file system) dumps every thread's stack
  and exits instead of holding the allocation until the time limit.
- `injected(kind, step)`: test hooks from `CHERRY_FAULT_INJECT`, e.g. `nan_loss@3,crash_in_save@6,hang@5,pause@4`;
  unset in real runs, where it costs one dict lookup.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from cherry_megatron import compat

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" (the requeue itself keys on the marker file)
FAULT_ENV = "CHERRY_FAULT_INJECT"


class Preemption:
    """A stop requested by a signal, honoured at the next step boundary by every rank."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signals, self.received, self._previous = signals, None, {}

    def __enter__(self) -> "Preemption":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal: a rank that stops alone would hang the others.
        SLURM signals every task, but not at the same instant."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class StepWatchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def arm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)

    def disarm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()


def _plan() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, step = item.partition("@")
        out.setdefault(kind.strip(), set()).add(int(step))
    return out


def injected(kind: str, step: int) -> bool:
    """Whether the test asked for fault `kind` at (1-based) training step `step`."""
    return FAULT_ENV in os.environ and step in _plan().get(kind, ())


def stall(step: int, preemption: "Preemption | None" = None) -> None:
    """`hang@N`: step N never ends. `pause@N`: step N waits until this rank has a signal, or 5 s (a rank
    the test does not signal waits those out), so a test can signal during the step under any load."""
    if injected("hang", step):
        _say(f"hang at step {step}")
        time.sleep(3600)
    if injected("pause", step):
        _say(f"pause at step {step}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (preemption and preemption.received):
            time.sleep(0.1)


def _say(what: str) -> None:
    sys.stderr.write(f"fault injected: {what}\n")
    sys.stderr.flush()


def crash_during_save(engine) -> None:
    """Make the engine's next checkpoint die after writing its first file, as a node lost mid-save would."""
    def first_then_crash(save, state_dict, path):
        save(state_dict, path)
        _say(f"crash after writing {path}")
        os._exit(1)

    compat.wrap_checkpoint_save(engine, first_then_crash)
