"""User-facing errors: one clear line, a non-zero exit, no traceback.

Anything the user can fix (a config key, a data file, a run directory) raises `UserError`; entry points
wrap their body in `cli_errors()` so the operator sees `error: <what is wrong>` and exit status 2,
while real bugs still show their traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class TrainingError(UserError):
    """The run cannot go on (e.g. the loss keeps diverging); the message says why and what to do."""


@contextlib.contextmanager
def cli_errors():
    try:
        yield
    except UserError as e:
        # Under torchrun every rank hits the same validation error; one line is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
