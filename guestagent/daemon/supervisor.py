"""Run services in threads: explicit start order, reverse stop order, restart with
exponential backoff, and the same error logged at most once per period."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from guestagent.daemon.service import Service

log = logging.getLogger(__name__)

# Slot states, as ``guestagent status`` shows them.
STARTING, RUNNING, BACKOFF, DONE, STOPPED = "starting", "running", "backoff", "done", "stopped"


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


@dataclass
class _Slot:
    service: Service
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    state: str = STARTING
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    started_at: datetime | None = None


class Supervisor:
    def __init__(
        self,
        *,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        reset_after: float = 300.0,
        error_period: float = 300.0,
    ) -> None:
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.reset_after = reset_after
        self.throttle = ErrorThrottle(error_period)
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._frozen = threading.Event()  # set while draining: failed services stay down

    # -- composition ------------------------------------------------------------------
    def add(self, service: Service) -> None:
        with self._lock:
            if any(s.service.name == service.name for s in self._slots):
                raise ValueError(f"service {service.name!r} added twice")
            self._slots.append(_Slot(service))

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [s.service.name for s in self._slots]

    def service(self, name: str) -> Service | None:
        with self._lock:
            return next((s.service for s in self._slots if s.service.name == name), None)

    def start(self) -> None:
        """Start every service that is not running yet, in the order they were added."""
        with self._lock:
            pending = [s for s in self._slots if s.thread is None]
        for slot in pending:
            self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        slot.thread = threading.Thread(
            target=self._loop, args=(slot,), name=f"svc-{slot.service.name}", daemon=True
        )
        slot.thread.start()

    # -- the per-service loop ---------------------------------------------------------
    def _loop(self, slot: _Slot) -> None:
        svc = slot.service
        while not slot.stop.is_set():
            slot.state = RUNNING
            slot.started_at = datetime.now(UTC)
            began = time.monotonic()
            try:
                svc.run(slot.stop)
            except Exception as exc:  # a service bug must not take the daemon down
                error = f"{type(exc).__name__}: {exc}"
                self._record(slot, error, exc)
            else:
                if slot.stop.is_set():
                    break
                if svc.oneshot:
                    slot.state = DONE
                    return
                self._record(slot, "run() returned before stop was asked", None)
            if slot.stop.is_set() or self._frozen.is_set():
                break
            if time.monotonic() - began >= self.reset_after:
                slot.failures = 0
            slot.failures += 1
            delay = min(self.backoff_max, self.backoff * 2 ** (slot.failures - 1))
            slot.state = BACKOFF
            log.debug("service %s restarts in %.1fs", svc.name, delay)
            if slot.stop.wait(delay) or self._frozen.is_set():
                break
            slot.restarts += 1
        slot.state = STOPPED

    def _record(self, slot: _Slot, error: str, exc: BaseException | None) -> None:
        slot.last_error = error
        slot.last_error_at = datetime.now(UTC)
        show, suppressed = self.throttle.check(f"{slot.service.name}\0{error}")
        if show:
            extra = f" (and {suppressed} more times since last logged)" if suppressed else ""
            log.error("service %s failed: %s%s", slot.service.name, error, extra,
                      exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)

    # -- drain and stop ---------------------------------------------------------------
    def freeze(self) -> None:
        """Stop restarting failed services (the instance is draining)."""
        self._frozen.set()

    def drain(self, deadline: float, on_step: Callable[[str, float, str | None], None]
              | None = None) -> None:
        """Ask each service to drain, in reverse start order, all before ``deadline``."""
        with self._lock:
            slots = list(reversed(self._slots))
        for slot in slots:
            if slot.state in (STOPPED, DONE) and type(slot.service).drain is Service.drain:
                continue
            began = time.monotonic()
            error: str | None = None
            if began >= deadline:
                error = "skipped: deadline passed"
            else:
                try:
                    slot.service.drain(deadline)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.error("service %s failed to drain: %s", slot.service.name, error)
            if on_step is not None:
                on_step(slot.service.name, time.monotonic() - began, error)

    def stop(self, deadline: float) -> list[str]:
        """Stop services in reverse start order; return those still running at ``deadline``."""
        with self._lock:
            slots = list(reversed(self._slots))
        stuck: list[str] = []
        for slot in slots:
            slot.stop.set()
            if slot.thread is not None:
                slot.thread.join(max(0.0, deadline - time.monotonic()))
                if slot.thread.is_alive():
                    stuck.append(slot.service.name)
        if stuck:
            log.warning("services still stopping at the deadline: %s", ", ".join(stuck))
        return stuck

    def replace(self, service: Service, timeout: float) -> bool:
        """Swap the service of the same name for ``service`` (settings reload), keeping its
        place in the order. False when the old one did not stop in time (then both run)."""
        with self._lock:
            slot = next((s for s in self._slots if s.service.name == service.name), None)
            if slot is None:
                raise KeyError(service.name)
            index = self._slots.index(slot)
            new = _Slot(service)
            self._slots[index] = new
        slot.stop.set()
        stopped = True
        if slot.thread is not None:
            slot.thread.join(timeout)
            stopped = not slot.thread.is_alive()
        self._launch(new)
        return stopped

    # -- reporting --------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            slots = list(self._slots)
        out = []
        for slot in slots:
            try:
                extra = slot.service.status()
                healthy = slot.service.healthy()
            except Exception as exc:
                extra, healthy = {"status_error": str(exc)}, False
            out.append(
                {
                    "name": slot.service.name,
                    "state": slot.state,
                    "healthy": healthy and slot.state != BACKOFF,
                    "restarts": slot.restarts,
                    "last_error": slot.last_error,
                    "last_error_at": _iso(slot.last_error_at),
                    "started_at": _iso(slot.started_at),
                    **({"details": extra} if extra else {}),
                }
            )
        return out

    def healthy(self) -> bool:
        return all(s["healthy"] for s in self.snapshot())


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None
