"""The one way this project runs other programs.

Every subprocess goes through :func:`run`: argv only (never a shell string built from
input), a timeout that kills the whole process group, output captured and logged at
DEBUG. Tests can police this choke point by patching :data:`RUNNER`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
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
) -> Result:
    """Run ``argv`` to completion; on timeout kill its process group and report it."""
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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
