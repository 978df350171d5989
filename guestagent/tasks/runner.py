"""What runs one task instance: a host process group or a Docker container, one contract.

A :class:`Runner` starts a :class:`Launch` and returns a :class:`Handle` whose ``ref`` is
persisted before anyone waits on it; after a restart ``adopt(ref)`` finds the same
process/container again (still running or finished with its exit code) or reports it gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from guestagent import process
from guestagent.tasks.errors import TaskError

log = logging.getLogger(__name__)

# Leaves traces on disk for a restarted agent: its own pid first (found again even if the
# agent died before recording it), then the command's exit code. The shell traps TERM/INT
# (a handler, not "ignore", so the command itself keeps the default disposition), waits
# for the command and writes its status before exiting with it. Builtins only (no mv: one
# process less per instance): the status is read only once the shell is gone, and a
# shell killed before its one small write() leaves an empty file, read as "killed".
_SHIM = ('f=$1; echo $$ >"$2"; shift 2; trap : TERM INT; "$@"; rc=$?; '
         'echo $rc >"$f"; exit $rc')


@dataclass(frozen=True)
class Bind:
    host: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Launch:
    """One attempt of one instance."""

    name: str  # job.task.index, for logs and container names
    argv: list[str]
    env: Mapping[str, str] = field(repr=False)  # may hold a task-scoped token
    workdir: Path  # host directory holding the unpacked package
    stdout: Path
    stderr: Path
    state_dir: Path  # the attempt's private files (exit code)
    image: str | None = None
    binds: tuple[Bind, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


class Handle(Protocol):
    ref: str

    def wait(self, timeout: float | None) -> int | None:
        """The exit code once ended, or None if still running after ``timeout`` seconds."""

    def stop(self, grace: float) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""


class Runner(Protocol):
    kind: str

    def start(self, launch: Launch) -> Handle: ...

    def adopt(self, ref: str, launch: Launch) -> Handle | None:
        """The instance named by ``ref`` (running or ended), or None if no trace is left."""


def exit_status(returncode: int | None) -> int | None:
    """A shell-style status: 128+N for a process ended by signal N."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


# -- host ---------------------------------------------------------------------------------

class _HostChild:
    def __init__(self, child: process.Child, ref: str) -> None:
        self.child = child
        self.ref = ref

    def wait(self, timeout: float | None) -> int | None:
        return exit_status(self.child.wait(timeout))

    def stop(self, grace: float) -> int | None:
        return exit_status(self.child.stop(grace))


class _AdoptedHost:
    """A process group left by a previous agent: not our child, so polled, not waited."""

    def __init__(self, pid: int, start: str, exit_file: Path, ref: str) -> None:
        self.pid, self.start, self.exit_file, self.ref = pid, start, exit_file, ref

    def _alive(self) -> bool:
        return _start_time(self.pid) == self.start

    def _code(self) -> int | None:
        try:
            return int(self.exit_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def wait(self, timeout: float | None) -> int | None:
        end = None if timeout is None else time.monotonic() + timeout
        while self._alive():
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(0.1)
        code = self._code()
        return 137 if code is None else code  # killed with its shell: no status written

    def stop(self, grace: float) -> int | None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._alive():
                os.killpg(self.pid, signal.SIGTERM)
        if self.wait(grace) is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.wait(grace)
        return self.wait(0)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): pid + this
    names one process even if the pid is reused. None when gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class HostRunner:
    """The command in its own process group on the host, with the Docker contract's env."""

    kind = "host"

    def start(self, launch: Launch) -> _HostChild:
        launch.state_dir.mkdir(parents=True, exist_ok=True)
        exit_file = launch.state_dir / "exit"
        with contextlib.suppress(FileNotFoundError):
            exit_file.unlink()
        argv = ["/bin/sh", "-c", _SHIM, "guestagent-task", str(exit_file),
                str(launch.state_dir / "pid"), *launch.argv]
        try:
            child = process.spawn(argv, name=launch.name, env=dict(launch.env),
                                  cwd=str(launch.workdir), log_path=launch.stdout,
                                  stderr_path=launch.stderr)
        except process.ProcessError as exc:
            raise TaskError(f"{launch.name}: {exc}") from None
        start = _start_time(child.pid) or ""
        return _HostChild(child, f"{child.pid}:{start}:{exit_file}")

    def adopt(self, ref: str, launch: Launch) -> _AdoptedHost | None:
        if not ref:
            ref = self._traces(launch)
        try:
            pid_text, start, exit_path = ref.split(":", 2)
            pid = int(pid_text)
        except ValueError:
            return None
        handle = _AdoptedHost(pid, start, Path(exit_path), ref)
        if handle._alive() or handle._code() is not None:
            return handle
        return None

    @staticmethod
    def _traces(launch: Launch) -> str:
        """A ref rebuilt from the attempt's own files (the agent died before saving it)."""
        exit_file = launch.state_dir / "exit"
        try:
            pid = int((launch.state_dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return ""
        start = ""
        if str(exit_file).encode() in _cmdline(pid):  # that pid is still our shell
            start = _start_time(pid) or ""
        return f"{pid}:{start}:{exit_file}"
