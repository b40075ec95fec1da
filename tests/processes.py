"""Killing a command and everything it started, as a crash of its machine would."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session``: a command started with ``start_new_session`` and the
    local Ray it started. Its process group alone is not enough: Ray's workers run in process
    groups of their own and go on training (and checkpointing) for seconds after the driver
    dies. They are found in /proc (Linux); elsewhere only the group is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session, signal.SIGKILL)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except OSError:  # the process has exited meanwhile
            continue
        if int(fields[3]) == session:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)
