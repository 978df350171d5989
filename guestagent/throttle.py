"""Rate-limiting of repeated log lines: the same message at most once per period, with a
count of what was held back. Used by the supervisor, the spot and maintenance watchers and
the child-process helpers (at the bottom of the import graph, so none of them import the
others for it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ErrorThrottle:
    """Says whether an error should be logged now: each key at most once per ``period``."""

    def __init__(self, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> tuple[bool, int]:
        """(log it now?, how many were suppressed since it was last logged)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            return True, self._suppressed.pop(key, 0)

    def suffix(self, key: str) -> str | None:
        """None when ``key`` is held back now, else the text to append to the log line."""
        show, suppressed = self.check(key)
        if not show:
            return None
        return f" ({suppressed} similar since last logged)" if suppressed else ""
