"""Processes on this host: whether one is still alive."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host (one owned by another user counts as alive;
    a zombie, which has exited but not yet been reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (state Z or X in Linux's ``/proc/<pid>/stat``);
    False where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (command) state ...": the command may hold spaces and parentheses, so split after the last ")"
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])
