"""The one way this project runs other programs.

Every subprocess goes through :func:`run`: argv only (never a shell string built from
input), a timeout that kills the whole process group, output captured and logged at
DEBUG. Tests can police this choke point by patching :data:`RUNNER`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ProcessError(Exception):
    """A program could not be started, timed out, or (with ``check``) failed."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 60.0,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    cwd: str | None = None,
    check: bool = False,
    memory_limit: int | None = None,
    die_with_parent: bool = False,
) -> Result:
    """Run ``argv`` to completion; on timeout kill its process group and report it.

    ``memory_limit`` caps the child's address space (bytes, RLIMIT_AS): a validator fed a
    hostile document fails with MemoryError instead of growing to gigabytes.
    ``die_with_parent`` has the kernel SIGKILL the child if this process dies first
    (PR_SET_PDEATHSIG), for helpers that must never outlive the agent."""
    args = tuple(str(a) for a in argv)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            # Only set when asked for (short helpers); it makes two system calls, no locks.
            preexec_fn=_limits(memory_limit, die_with_parent),  # noqa: PLW1509
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {args[0]}: {exc.strerror or exc}") from exc
    timed_out = False
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, err = proc.communicate()
    result = Result(args, proc.returncode, out, err, time.monotonic() - start, timed_out)
    log.debug("ran %s -> rc=%s in %.3fs", args[0], result.returncode, result.seconds)
    if check and not result.ok:
        why = f"timed out after {timeout}s" if timed_out else f"exited {result.returncode}"
        detail = err.decode(errors="replace").strip().splitlines()
        raise ProcessError(f"{args[0]} {why}" + (f": {detail[-1]}" if detail else ""))
    return result


class Child:
    """A long-running child started by :func:`spawn`: its own process group, ended with it.

    ``stop`` sends SIGTERM to the group, waits ``grace`` seconds, then SIGKILLs the group.
    """

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self._proc = proc
        self.name = name

    def __repr__(self) -> str:  # argv may carry paths, never secrets; keep it short anyway
        return f"Child({self.name!r}, pid={self.pid})"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        if self._proc.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait(grace) is None:
                _kill_group(self._proc)
                self.wait(grace)
        else:
            # The leader is gone; members of its group may not be.
            self.signal(signal.SIGKILL)
        return self._proc.returncode


def spawn(
    argv: Sequence[str],
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
) -> Child:
    """Start ``argv`` in the background in its own process group.

    Output goes to ``log_path`` (appended) or is discarded: never to a pipe that nobody
    reads. The caller ends it with :meth:`Child.stop`.
    """
    args = tuple(str(a) for a in argv)
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {args[0]}: {exc.strerror or exc}") from exc
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
    if stdin is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        proc.stdin.close()
    log.debug("spawned %s pid=%s", args[0], proc.pid)
    return Child(proc, name or os.path.basename(args[0]))


_PR_SET_PDEATHSIG = 1


def _limits(memory_limit: int | None, die_with_parent: bool) -> Callable[[], None] | None:
    """What the child does between fork and exec (nothing that allocates or locks)."""
    if memory_limit is None and not die_with_parent:
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl if die_with_parent else None
    parent = os.getpid()

    def apply() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the prctl took hold
                os._exit(1)

    return apply


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
