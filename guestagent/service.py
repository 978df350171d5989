"""The contract every long-running part of the agent honours, so one supervisor can start,
watch, restart, drain and report on all of them (credentials, spot, first boot, storage,
tasks, migrations).

This module sits at the bottom of the import graph: capabilities import it, and only the
daemon's registry (``guestagent/daemon/registry.py``) imports the capabilities.

A service in one page::

    class Mounts(Service):
        name = "storage"
        ready_on_start = False          # dependents wait for mark_ready()

        def run(self, stop):
            self.remount_what_was_mounted()
            self.mark_ready()
            while not self.wait(stop, 5.0):  # beats, then waits (True once stop is set)
                self.check_mounts()          # a hang here stops the heartbeat

Supervision is honest: the daemon feeds systemd's watchdog only while every running
service's heartbeat is younger than its ``heartbeat_timeout``. A loop that does real work
calls :meth:`beat` (or :meth:`wait`, which beats) at least that often; a service whose
``run`` only waits on ``stop`` uses :meth:`wait` too. A service that never beats is reported
stale after ``heartbeat_timeout`` seconds, shown unhealthy in ``guestagent status``, and
under systemd the watchdog then restarts the agent.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any


class Service(ABC):
    """A supervised service.

    ``run`` blocks until ``stop`` is set; returning early or raising counts as a failure and
    the supervisor restarts it on the same instance with backoff (unless ``oneshot`` and it
    returned normally). A restart must leak nothing: threads and subscriptions made by one
    ``run`` end with it. ``drain`` is called on spot termination / shutdown in reverse
    dependency order, before ``stop`` is set, and must finish by ``deadline`` (a
    ``time.monotonic()`` value).
    """

    name: str = "service"
    oneshot: bool = False
    # Longest gap between two heartbeats before the service counts as hung. None: not
    # watched (a one-shot whose child process has its own timeout).
    heartbeat_timeout: float | None = 120.0
    # True: ready as soon as run() starts. False: dependents wait for mark_ready().
    ready_on_start: bool = True

    # Plain attributes, not set in __init__, so subclasses need not call super().__init__().
    _beat_at: float | None = None
    _ready: bool = False
    _on_ready: Callable[[Service], None] | None = None

    @abstractmethod
    def run(self, stop: threading.Event) -> None: ...

    def drain(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """Finish or hand off in-flight work before ``deadline``; default: nothing to do."""

    def status(self) -> dict[str, Any]:
        """Service-specific facts for ``guestagent status`` (no secrets)."""
        return {}

    def summary(self) -> str | None:
        """One human line for ``guestagent status`` (no secrets); None: nothing to add."""
        return None

    def healthy(self) -> bool:
        return True

    def problem(self) -> str | None:
        """Why the service is unhealthy right now (its last real error), or None."""
        return None

    # -- heartbeat and readiness (called by the service; read by the supervisor) ---------
    def beat(self) -> None:
        """I am making progress: call from the service's loop."""
        self._beat_at = time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Beat, then wait up to ``seconds`` for ``stop`` (beating through long waits);
        True once ``stop`` is set. The idle point of a loop is a live point."""
        end = time.monotonic() + max(seconds, 0.0)
        step = max((self.heartbeat_timeout or 60.0) / 3, 0.05)
        while True:
            self.beat()
            left = end - time.monotonic()
            if left <= 0:
                return stop.is_set()
            if stop.wait(min(left, step)):
                return True

    def mark_ready(self) -> None:
        """Dependents may start now (see ``ready_on_start``)."""
        if self._ready:
            return
        self._ready = True
        callback = self._on_ready
        if callback is not None:
            callback(self)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def last_beat(self) -> float | None:
        return self._beat_at


__all__ = ["Service"]
