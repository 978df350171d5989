"""One daemon per state directory: an fcntl lock held for the daemon's life.

The kernel drops the lock when the process dies (even by kill -9), so a stale lock file
never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from guestagent.files import atomic_write


class AlreadyRunning(Exception):
    """Another daemon holds the lock; the message names its pid when known."""


class DaemonLock:
    def __init__(self, state_dir: Path, run_dir: Path) -> None:
        self.path = state_dir / "daemon.lock"
        self.pid_file = run_dir / "guestagent.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self._read_pid()
            who = f" (pid {pid})" if pid else ""
            raise AlreadyRunning(
                f"another guestagent daemon is running{who}: it holds {self.path}"
            ) from None
        self._fd = fd
        atomic_write(self.pid_file, f"{os.getpid()}\n", mode=0o644)

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._read_pid() == os.getpid():
                self.pid_file.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None
