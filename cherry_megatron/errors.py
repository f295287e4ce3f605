"""User-facing errors: one clear line, a non-zero exit, no traceback.

Anything the user can fix (a config key, a data file, a run directory) raises `UserError`; entry points
wrap their body in `cli_errors()` so the operator sees `error: <what is wrong>` and exit status 2,
while real bugs still show their traceback (exit 1). A run that cannot go on from valid input (its loss
diverged) raises `TrainingError`: the same one line, exit status 3.
"""
from __future__ import annotations

import contextlib
import os
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line."""
    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class TrainingError(Exception):
    """The run cannot go on (e.g. the loss keeps diverging); the message says why and what to do.

    Not a UserError: the input was valid and the run failed. Its own status, 3, keeps it apart from bad
    input (2, as argparse exits), from a crash with a traceback (1) and from a preemption's requeue (75,
    faults.REQUEUE_EXIT_CODE), so a sweep or a batch script can tell "diverged: lower the lr" from "fix the
    command" and from "a bug"."""
    exit_code = 3


@contextlib.contextmanager
def cli_errors():
    try:
        yield
    except (UserError, TrainingError) as e:
        # Under torchrun every rank hits the same validation error; one line is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
