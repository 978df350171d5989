"""Watch ``instance/spot/termination-time`` and hand each new notice to the daemon once.

A metadata error is not a notice: it is counted, logged at most once per period, and the
next poll goes on at the usual rate, so a flaky service during the notice window only delays
seeing the notice by as long as it stays flaky.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from guestagent.daemon.service import Service
from guestagent.daemon.supervisor import ErrorThrottle
from guestagent.metadata.errors import MetadataError
from guestagent.spot.drain import Notice, iso, iso_ms, load_report
from guestagent.spot.settings import SpotSettings

log = logging.getLogger(__name__)


class SpotSource(Protocol):
    def spot_termination_time(self) -> datetime | None: ...


class SpotWatcher(Service):
    name = "spot"

    def __init__(
        self,
        client: SpotSource,
        settings: SpotSettings,
        state_dir: Path,
        on_notice: Callable[[Notice], None],
        error_period: float = 300.0,
    ) -> None:
        self.client = client
        self.settings = settings
        self.state_dir = state_dir
        self.on_notice = on_notice
        self._throttle = ErrorThrottle(error_period)
        self._lock = threading.Lock()
        self.notice: Notice | None = None
        self.polls = 0
        self.errors = 0
        self.last_poll: datetime | None = None
        self.last_error: str | None = None
        self._failing = False
        # A notice whose drain already completed (before a restart) is not drained again.
        report = load_report(state_dir)
        done = report is not None and report.get("completed")
        self._done_key = report.get("termination_time") if report and done else None

    def run(self, stop: threading.Event) -> None:
        interval = self.settings.poll_interval
        next_at = time.monotonic()
        while not stop.is_set():
            self.poll()
            # Fixed-rate schedule: a slow answer does not push every later poll back.
            next_at += interval
            now = time.monotonic()
            next_at = max(next_at, now)
            stop.wait(next_at - now)

    def poll(self) -> Notice | None:
        """One poll; returns the notice when this poll is the one that first saw it."""
        try:
            when = self.client.spot_termination_time()
        except MetadataError as exc:
            self._error(str(exc))
            return None
        except Exception as exc:
            # Not even a bug here may stop the polling: a crash would mean a restart
            # backoff, and a late notice.
            self._error(f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self.polls += 1
            self.last_poll = datetime.now(UTC)
            if self._failing:
                log.info("spot poll works again")
                self._failing = False
            if when is None:
                if self.notice is not None:
                    log.warning("spot notice for %s was withdrawn; the drain already began",
                                self.notice.key)
                return None
            if self.notice is not None:
                if iso(when) != self.notice.key:
                    log.warning("spot termination time moved to %s (draining for %s)",
                                iso(when), self.notice.key)
                return None
            notice = Notice(when, datetime.now(UTC), time.monotonic())
            self.notice = notice
        if notice.key == self._done_key:
            log.warning("spot notice for %s was already drained before a restart", notice.key)
            return None
        log.warning("spot termination notice: the instance is released at %s", notice.key)
        self.on_notice(notice)
        return notice

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = message
            self._failing = True
        show, suppressed = self._throttle.check(message)
        if show:
            more = f" ({suppressed} similar since last logged)" if suppressed else ""
            log.warning("spot poll failed: %s%s", message, more)

    def status(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "state": "notice" if self.notice else "watching",
                "poll_interval": self.settings.poll_interval,
                "polls": self.polls,
                "errors": self.errors,
                "last_poll": iso_ms(self.last_poll) if self.last_poll else None,
                "last_error": self.last_error,
                "failing": self._failing,
            }
            if self.notice:
                out["termination_time"] = self.notice.key
                out["seen_at"] = iso_ms(self.notice.seen_at)
            return out

    def healthy(self) -> bool:
        # A failing poll means a notice could be missed: that is worth a non-zero status.
        with self._lock:
            return not self._failing
