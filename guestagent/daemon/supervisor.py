"""Run services in threads: a service starts once the services it requires are ready,
restarts with exponential backoff, heartbeats are checked, the same error is logged at most
once per period, and drain/stop go in reverse dependency order, each level in parallel
within its fair share of one budget (one hung service never leaves the others unstopped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from guestagent.service import Service
from guestagent.throttle import ErrorThrottle

log = logging.getLogger(__name__)

# Slot states, as ``guestagent status`` shows them.
WAITING, STARTING, RUNNING, BACKOFF, DONE, STOPPED = (
    "waiting", "starting", "running", "backoff", "done", "stopped")
WAIT_STEP = 1.0  # a waiting slot re-checks its stop event this often

StepCallback = Callable[[str, float, str | None], None]

__all__ = ["ErrorThrottle", "Supervisor"]


@dataclass
class _Slot:
    service: Service
    requires: tuple[str, ...] = ()
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    state: str = STARTING
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    started_at: datetime | None = None
    started_mono: float | None = None

    def beat_age(self, now: float) -> float | None:
        """Seconds since the last heartbeat of the current run (None: not watched)."""
        svc = self.service
        if self.state != RUNNING or svc.heartbeat_timeout is None or svc.oneshot:
            return None
        marks = [m for m in (svc.last_beat, self.started_mono) if m is not None]
        return now - max(marks) if marks else None


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
        self._changed = threading.Condition(self._lock)  # a service became ready
        self._frozen = threading.Event()  # set while draining: failed services stay down

    # -- composition ------------------------------------------------------------------
    def add(self, service: Service, requires: Iterable[str] = ()) -> None:
        """Add a service after those it requires (which must have been added first)."""
        needs = tuple(dict.fromkeys([*requires, *getattr(service, "requires", ())]))
        with self._lock:
            names = [s.service.name for s in self._slots]
            if service.name in names:
                raise ValueError(f"service {service.name!r} added twice")
            missing = [n for n in needs if n not in names]
            if missing:
                raise ValueError(f"service {service.name!r} requires {', '.join(missing)}, "
                                 "which is not running (enable it, or disable this one)")
            self._slots.append(_Slot(service, needs))

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [s.service.name for s in self._slots]

    def service(self, name: str) -> Service | None:
        with self._lock:
            return next((s.service for s in self._slots if s.service.name == name), None)

    def ready_service(self, name: str) -> Service | None:
        """The service called ``name`` if it is ready now, else None."""
        svc = self.service(name)
        return svc if svc is not None and svc.ready else None

    def dependents(self, name: str) -> list[str]:
        """Services that require ``name``, directly or not, in start order."""
        with self._lock:
            slots = list(self._slots)
        out: list[str] = []
        wanted = {name}
        for slot in slots:
            if wanted & set(slot.requires):
                out.append(slot.service.name)
                wanted.add(slot.service.name)
        return out

    def start(self) -> None:
        """Start every service that is not running yet, in the order they were added."""
        with self._lock:
            pending = [s for s in self._slots if s.thread is None]
        for slot in pending:
            self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        slot.service._on_ready = self._note_ready
        slot.thread = threading.Thread(
            target=self._loop, args=(slot,), name=f"svc-{slot.service.name}", daemon=True
        )
        slot.thread.start()

    def _note_ready(self, service: Service) -> None:
        log.debug("service %s is ready", service.name)
        with self._changed:
            self._changed.notify_all()

    # -- the per-service loop ---------------------------------------------------------
    def _requirements_met(self, slot: _Slot) -> bool:
        """Wait (state "waiting") until every required service is ready; False on stop."""
        while not slot.stop.is_set():
            with self._changed:
                ready = {s.service.name for s in self._slots if s.service.ready}
                if set(slot.requires) <= ready:
                    return True
                slot.state = WAITING
                self._changed.wait(WAIT_STEP)
        return False

    def _loop(self, slot: _Slot) -> None:
        svc = slot.service
        while self._requirements_met(slot):
            svc._ready = False
            slot.state = RUNNING
            slot.started_at = datetime.now(UTC)
            began = slot.started_mono = time.monotonic()
            if svc.ready_on_start:
                svc.mark_ready()
            error = self._run_once(slot)
            if slot.state != DONE:
                svc._ready = False
            if error is None:  # stopped as asked, or a one-shot that finished
                break
            self._record(slot, error[0], error[1])
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
        if slot.state != DONE:
            slot.state = STOPPED

    def _run_once(self, slot: _Slot) -> tuple[str, BaseException | None] | None:
        """One call of ``run``: None when it ended as it should, else (error, exception)."""
        svc = slot.service
        try:
            svc.run(slot.stop)
        except Exception as exc:  # a service bug must not take the daemon down
            return f"{type(exc).__name__}: {exc}", exc
        if slot.stop.is_set():
            return None
        if svc.oneshot:
            slot.state = DONE
            svc.mark_ready()  # what requires a one-shot waits for it to finish
            return None
        return "run() returned before stop was asked", None

    def _record(self, slot: _Slot, error: str, exc: BaseException | None) -> None:
        slot.last_error = error
        slot.last_error_at = datetime.now(UTC)
        more = self.throttle.suffix(f"{slot.service.name}\0{error}")
        if more is not None:
            log.error("service %s failed: %s%s", slot.service.name, error, more,
                      exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)

    # -- heartbeats -------------------------------------------------------------------
    def stale(self) -> dict[str, float]:
        """Running services whose last heartbeat is older than their timeout: name -> age."""
        now = time.monotonic()
        with self._lock:
            slots = list(self._slots)
        out = {}
        for slot in slots:
            age = slot.beat_age(now)
            limit = slot.service.heartbeat_timeout
            if age is not None and limit is not None and age > limit:
                out[slot.service.name] = age
        return out

    # -- drain and stop ---------------------------------------------------------------
    def freeze(self) -> None:
        """Stop restarting failed services (the instance is draining)."""
        self._frozen.set()

    def _levels(self) -> list[list[_Slot]]:
        """Slots grouped by dependency depth, deepest (the dependents) first."""
        with self._lock:
            slots = list(self._slots)
        depth: dict[str, int] = {}
        for slot in slots:  # start order: requirements come first
            depth[slot.service.name] = 1 + max((depth.get(r, 0) for r in slot.requires),
                                               default=-1)
        levels: dict[int, list[_Slot]] = {}
        for slot in reversed(slots):
            levels.setdefault(depth[slot.service.name], []).append(slot)
        return [levels[d] for d in sorted(levels, reverse=True)]

    def _in_waves(self, action: Callable[[_Slot], None], deadline: float,
                  wanted: Callable[[_Slot], bool]) -> list[str]:
        """``action`` on every wanted slot, a level at a time, the slots of a level in
        parallel; a level gets an equal share of what is left. Returns the names still busy
        when the deadline came."""
        levels = [[s for s in level if wanted(s)] for level in self._levels()]
        levels = [level for level in levels if level]
        busy: list[str] = []
        for i, level in enumerate(levels):
            now = time.monotonic()
            cutoff = now + max(deadline - now, 0.0) / (len(levels) - i)
            workers = [threading.Thread(target=action, args=(slot,), daemon=True,
                                        name=f"end-{slot.service.name}") for slot in level]
            for worker in workers:
                worker.start()
            for slot, worker in zip(level, workers, strict=True):
                worker.join(max(0.0, cutoff - time.monotonic()))
                if worker.is_alive():
                    busy.append(slot.service.name)
        return busy

    def drain(self, deadline: float, on_step: StepCallback | None = None) -> list[str]:
        """Ask each service to drain, dependents first, all before ``deadline``; returns
        the services still draining at the deadline."""

        def one(slot: _Slot) -> None:
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

        def wanted(slot: _Slot) -> bool:
            # A service with nothing to drain (the default no-op) is not asked.
            return type(slot.service).drain is not Service.drain

        busy = self._in_waves(one, deadline, wanted)
        if busy:
            log.warning("services still draining at the deadline: %s", ", ".join(busy))
        return busy

    def stop(self, deadline: float) -> list[str]:
        """Stop services, dependents first; return those still running at ``deadline``."""

        def one(slot: _Slot) -> None:
            slot.stop.set()
            with self._changed:
                self._changed.notify_all()  # a slot waiting for its requirements
            if slot.thread is not None:
                slot.thread.join()

        stuck = self._in_waves(one, deadline, lambda slot: True)
        if stuck:
            log.warning("services still stopping at the deadline: %s", ", ".join(stuck))
        return stuck

    def replace(self, service: Service, timeout: float) -> bool:
        """Swap the service of the same name for ``service`` (settings reload), keeping its
        place and requirements. False when the old one did not stop in time (both run)."""
        with self._lock:
            slot = next((s for s in self._slots if s.service.name == service.name), None)
            if slot is None:
                raise KeyError(service.name)
            index = self._slots.index(slot)
            new = _Slot(service, slot.requires)
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
        now = time.monotonic()
        return [self._report(slot, now) for slot in slots]

    def _report(self, slot: _Slot, now: float) -> dict[str, Any]:
        svc = slot.service
        try:
            extra = svc.status()
            healthy = svc.healthy()
            problem = svc.problem()
            summary = svc.summary()
        except Exception as exc:
            extra, healthy, problem, summary = {}, False, f"status failed: {exc}", None
        age = slot.beat_age(now)
        if age is not None and svc.heartbeat_timeout is not None and age > svc.heartbeat_timeout:
            healthy, problem = False, f"no heartbeat for {age:.0f}s (hung?)"
        healthy = healthy and problem is None and slot.state != BACKOFF
        out: dict[str, Any] = {
            "name": svc.name,
            "state": slot.state,
            "healthy": healthy,
            "ready": svc.ready,
            "restarts": slot.restarts,
            "last_error": problem or slot.last_error,
            "last_error_at": None if problem else _iso(slot.last_error_at),
            "started_at": _iso(slot.started_at),
            "heartbeat_age": None if age is None else round(age, 1),
        }
        if slot.requires:
            out["requires"] = list(slot.requires)
        if summary:
            out["summary"] = summary
        if extra:
            out["details"] = extra
        return out

    def healthy(self) -> bool:
        return all(s["healthy"] for s in self.snapshot())


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None
