"""One daemon per state directory and per run directory: fcntl locks held for the daemon's
life, one in each (two daemons sharing only a run directory would fight over its control
socket and pid file; sharing only a state directory, over drain and first-boot state).

The kernel drops the locks when the process dies (even by kill -9), so a stale lock file
never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from guestagent.files import atomic_write
from guestagent.flocks import DAEMON_LOCK

LOCK_NAME = DAEMON_LOCK


class AlreadyRunning(Exception):
    """Another daemon holds the lock; the message names its pid when known."""


class DaemonLock:
    def __init__(self, state_dir: Path, run_dir: Path) -> None:
        self.paths = list(dict.fromkeys([state_dir / LOCK_NAME, run_dir / LOCK_NAME]))
        self.path = self.paths[0]
        self.pid_file = run_dir / "guestagent.pid"
        self._fds: list[int] = []

    def acquire(self) -> None:
        try:
            for path in self.paths:
                self._fds.append(self._take(path))
        except BaseException:
            self._close()
            raise
        atomic_write(self.pid_file, f"{os.getpid()}\n", mode=0o644)

    def _take(self, path: Path) -> int:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self._read_pid()
            who = f" (pid {pid})" if pid else ""
            raise AlreadyRunning(
                f"another guestagent daemon is running{who}: it holds {path}"
            ) from None
        return fd

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if not self._fds:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._read_pid() == os.getpid():
                self.pid_file.unlink()
        self._close()

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing drops the flock
        self._fds = []

