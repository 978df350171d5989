"""Waiting in tests: poll a condition until it holds, instead of sleeping a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    step: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """Return ``cond()``'s first truthy value; fail the test after ``timeout`` seconds.

    Exceptions in ``tolerate`` (e.g. a daemon's socket not there yet) count as "not yet".
    """
    end = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except tolerate:
            value = None
        if value:
            return value
        assert time.monotonic() < end, f"condition not met in {timeout}s"
        time.sleep(step)


def gone(pid: int) -> bool:
    """The process has exited (no such pid, or a zombie / dead entry): a condition to wait
    for after a stop."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
