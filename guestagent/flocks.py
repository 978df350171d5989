"""Who holds an flock, read from /proc/locks: for the CLI to see that a daemon runs without
importing the daemon (capabilities never reach up into it) and without taking the lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# The daemon holds this file in its state and run directories for its whole life.
DAEMON_LOCK = "daemon.lock"


def holder(path: Path) -> int | None:
    """The pid holding an flock on ``path``, or None when nobody does.

    Never by taking the lock: even a brief shared lock here could make a daemon starting
    at that instant believe another one runs."""
    try:
        st = path.stat()
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (blocked waiters say "->")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def daemon_holder(run_dir: Path) -> int | None:
    """The pid of the daemon running on ``run_dir``, or None."""
    return holder(run_dir / DAEMON_LOCK)
