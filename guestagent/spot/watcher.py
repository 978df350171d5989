"""Watch ``instance/spot/termination-time`` and ask the daemon, once per notice, for a drain.

A metadata error is not a notice: it is counted, logged at most once per period, and the
next poll goes on at the usual rate, so a flaky service during the notice window only delays
seeing the notice by as long as it stays flaky.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from guestagent.drain import DrainRequest, drained, iso, iso_ms
from guestagent.metadata.errors import MetadataError
from guestagent.service import Service
from guestagent.spot.settings import SpotSettings
from guestagent.throttle import ErrorThrottle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    termination_time: datetime  # UTC aware
    seen_at: datetime
    seen_mono: float

    @property
    def key(self) -> str:
        return iso(self.termination_time)


def drain_request(notice: Notice, settings: SpotSettings) -> DrainRequest:
    """The drain a notice asks for: done ``deadline_margin`` before the release."""
    final: tuple[str, ...] = ()
    if settings.final_action == "poweroff":
        final = tuple(settings.poweroff_command)
    return DrainRequest(
        key=notice.key,
        reason=f"spot termination at {notice.key}",
        deadline_at=notice.termination_time - timedelta(seconds=settings.deadline_margin),
        seen_at=notice.seen_at,
        hooks_dir=settings.hooks_dir,
        hook_env={"GUESTAGENT_TERMINATION_TIME": notice.key},
        hook_timeout=settings.hook_timeout,
        services_reserve=settings.services_reserve,
        final_command=final,
        exit_after=settings.exit_after_drain,
        facts={"termination_time": notice.key},
    )


class SpotSource(Protocol):
    def spot_termination_time(self) -> datetime | None: ...


class SpotWatcher(Service):
    name = "spot"

    def __init__(
        self,
        client: SpotSource,
        settings: SpotSettings,
        state_dir: Path,
        request_drain: Callable[[DrainRequest], None],
        error_period: float = 300.0,
    ) -> None:
        self.client = client
        self.settings = settings
        self.state_dir = state_dir
        self.request_drain = request_drain
        self._throttle = ErrorThrottle(error_period)
        self._lock = threading.Lock()
        self.notice: Notice | None = None
        self.polls = 0
        self.errors = 0
        self.last_poll: datetime | None = None
        self.last_error: str | None = None
        self._failing = False

    def run(self, stop: threading.Event) -> None:
        interval = self.settings.poll_interval
        next_at = time.monotonic()
        while not stop.is_set():
            self.poll()
            # Fixed-rate schedule: a slow answer does not push every later poll back.
            next_at += interval
            now = time.monotonic()
            next_at = max(next_at, now)
            self.wait(stop, next_at - now)

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
                    self._warn_once(f"spot notice for {self.notice.key} was withdrawn; "
                                    "the drain already began")
                return None
            if self.notice is not None:
                if iso(when) != self.notice.key:
                    self._warn_once(f"spot termination time moved to {iso(when)} "
                                    f"(draining for {self.notice.key})")
                return None
            notice = Notice(when, datetime.now(UTC), time.monotonic())
            self.notice = notice
        if drained(self.state_dir, notice.key):
            log.warning("spot notice for %s was already drained before a restart", notice.key)
            return None
        log.warning("spot termination notice: the instance is released at %s", notice.key)
        self.request_drain(drain_request(notice, self.settings))
        return notice

    def _warn_once(self, message: str) -> None:
        """The same warning at most once per period (the poll repeats every second)."""
        more = self._throttle.suffix(message)
        if more is not None:
            log.warning("%s%s", message, more)

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = message
            self._failing = True
        more = self._throttle.suffix(message)
        if more is not None:
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

    def summary(self) -> str:
        with self._lock:
            if self.notice:
                return (f"termination at {self.notice.key} "
                        f"(seen {iso_ms(self.notice.seen_at)})")
            text = "watching"
            if self.last_poll:
                text += f", last poll {iso_ms(self.last_poll)}"
            if self._failing:
                text += f", POLL FAILING: {self.last_error}"
            return text

    def problem(self) -> str | None:
        # A failing poll means a notice could be missed: unhealthy at once, saying why.
        with self._lock:
            return f"spot poll failing: {self.last_error}" if self._failing else None
