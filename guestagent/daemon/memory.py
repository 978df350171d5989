"""The daemon's own heap: it lives for months and idles, so it keeps little of what start-up
and bursts of work (a task, a transfer, a credential refresh) left behind.

glibc only: on another libc (musl) both are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

# glibc gives every thread that allocates an arena of its own (up to 8 per core): a dozen
# mostly idle service threads each keep a partly used one (about 1.5 MB of RSS in all).
# Their Python code runs under the GIL anyway, so two arenas lose nothing. Set in-process,
# not in the unit's environment: children (hooks, user-data, rclone) keep glibc's default.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
# Freed memory below the top of the heap stays resident until malloc_trim gives it back
# (about 1 MB after start-up). First soon after start, then now and then: it takes well
# under a millisecond on a heap this size.
TRIM_FIRST = 5.0
TRIM_EVERY = 600.0


def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_arenas() -> None:
    """Before any thread starts. An explicit ``MALLOC_ARENA_MAX`` in the environment wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(AttributeError):
        _libc().mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


class Trimmer:
    """Called from the daemon's loop; returns the heap's free pages to the system when due."""

    def __init__(self, now: float) -> None:
        self.next_at = now + TRIM_FIRST
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None)

    def tick(self, now: float) -> None:
        if self._trim is None or now < self.next_at:
            return
        self.next_at = now + TRIM_EVERY
        self._trim(0)

    def due_in(self, now: float) -> float:
        return max(self.next_at - now, 0.0)
