"""What runs one task instance: a host process group or a Docker container, one contract.

A :class:`Runner` starts a :class:`Launch` and returns a :class:`Handle` whose ``ref`` is
persisted before anyone waits on it; after a restart ``adopt(ref)`` finds the same
process/container again (still running or finished with its exit code) or reports it gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from guestagent import detached, process
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

class _AdoptedHost:
    """A host instance's process group, named by pid + start time: detached work (a
    transient unit, or a child of a previous agent), so watched through a pidfd (its
    end wakes us at once) rather than waited for."""

    def __init__(self, pid: int, start: str, exit_file: Path, ref: str) -> None:
        self.pid, self.start, self.exit_file, self.ref = pid, start, exit_file, ref
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            fd = os.pidfd_open(pid)
            if self._alive():  # opened on that very process, not on a reuse of its pid
                self._pidfd = fd
            else:
                os.close(fd)

    def __del__(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def _sleep(self, seconds: float) -> None:
        if self._pidfd is None:
            time.sleep(min(seconds, 0.1))
            return
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        poller.poll(max(0, int(seconds * 1000)))

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
            left = 1.0 if end is None else end - time.monotonic()
            if left <= 0:
                return None
            self._sleep(min(left, 1.0))
        self._reap()
        code = self._code()
        return 137 if code is None else code  # killed with its shell: no status written

    def _reap(self) -> None:
        """Collect it if it is our own child (started here without systemd): through its
        pidfd, that very process, not a scan of all our children at every instance end."""
        if self._pidfd is None:
            process.reap_adopted()
            return
        with contextlib.suppress(ChildProcessError, OSError):  # not ours: init reaps it
            os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)

    def stop(self, grace: float) -> int | None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._alive():
                os.killpg(self.pid, signal.SIGTERM)
        if self.wait(grace) is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.wait(grace)
        return self.wait(0)


def unit_name(name: str) -> str:
    """A detached-work name for one attempt of ``job.task.index``: unique (a retry never
    meets the unit of the attempt before it, still being collected), short enough."""
    job, _, rest = name.partition(".")
    task, _, index = rest.rpartition(".")
    return f"task-{job[-12:]}-{task[:48]}-{index}-{secrets.token_hex(3)}"


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
    """The command in its own process group on the host, with the Docker contract's env.

    It runs as detached work (:mod:`guestagent.detached`): under systemd a transient unit
    of its own, outside the agent's cgroup, so an agent stop (``KillMode=mixed``) or
    restart leaves it running; without systemd a child nothing of the agent kills as a
    leftover. Either way the next agent re-adopts it from its ``ref`` (pid, start time,
    exit file) or, if the agent died before saving that, from the attempt's own traces."""

    kind = "host"

    def __init__(self, run_dir: Path | None = None) -> None:
        # Where a transient unit's environment file (the task's token) lives for the
        # instant of its start: the agent's run dir, a tmpfs. Without systemd, detached's
        # record goes to the attempt's private dir (the task store's ref is what counts).
        self.run_dir = run_dir

    def start(self, launch: Launch) -> _AdoptedHost:
        launch.state_dir.mkdir(parents=True, exist_ok=True)
        exit_file = launch.state_dir / "exit"
        with contextlib.suppress(FileNotFoundError):
            exit_file.unlink()
        argv = ["/bin/sh", "-c", _SHIM, "guestagent-task", str(exit_file),
                str(launch.state_dir / "pid"), *launch.argv]
        try:
            run_dir = self.run_dir if process.systemd_running() else None
            work = detached.start(unit_name(launch.name), argv,
                                  run_dir=run_dir or launch.state_dir,
                                  env=dict(launch.env), cwd=str(launch.workdir),
                                  log_path=launch.stdout, stderr_path=launch.stderr)
        except (process.ProcessError, ValueError) as exc:
            raise TaskError(f"{launch.name}: {exc}") from None
        pid = work.pid
        if pid is None:
            raise TaskError(f"{launch.name}: started, but its process is not known")
        start = _start_time(pid) or ""
        return _AdoptedHost(pid, start, exit_file, f"{pid}:{start}:{exit_file}")

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
