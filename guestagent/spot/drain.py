"""The ordered drain run on a spot termination notice, against a deadline.

Steps: stop taking new work -> ``spot.d`` hooks in name order -> services drain in reverse
start order -> optional final action. Each step's duration and whether the deadline held
are logged and kept in ``<state_dir>/spot/drain.json`` (rewritten after every step, so the
progress of a drain cut short survives too).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.files import atomic_write
from guestagent.spot.hooks import run_hooks
from guestagent.spot.settings import SpotSettings

log = logging.getLogger(__name__)

MIN_BUDGET = 1.0  # a notice seen too late still gets this long to flush what it can
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

StepCallback = Callable[[str, float, str | None], None]


@dataclass(frozen=True)
class Notice:
    termination_time: datetime  # UTC aware
    seen_at: datetime
    seen_mono: float

    @property
    def key(self) -> str:
        return iso(self.termination_time)


def iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime(TIME_FORMAT)


def iso_ms(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def deadline_for(notice: Notice, margin: float) -> float:
    """The drain's deadline as a ``time.monotonic()`` value: termination time - margin."""
    left = (notice.termination_time - datetime.now(UTC)).total_seconds() - margin
    return time.monotonic() + max(left, MIN_BUDGET)


def state_file(state_dir: Path) -> Path:
    return state_dir / "spot" / "drain.json"


def load_report(state_dir: Path) -> dict[str, Any] | None:
    """The last drain's report, or None (absent or unreadable)."""
    try:
        data = json.loads(state_file(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Drain:
    def __init__(
        self,
        notice: Notice,
        settings: SpotSettings,
        state_dir: Path,
        *,
        stop_new_work: Callable[[], None],
        drain_services: Callable[[float, StepCallback], None],
    ) -> None:
        self.notice = notice
        self.settings = settings
        self.path = state_file(state_dir)
        self._stop_new_work = stop_new_work
        self._drain_services = drain_services
        self._lock = threading.RLock()  # guards the deadline and the report
        self._deadline = deadline_for(notice, settings.deadline_margin)
        self._started = time.monotonic()
        self.interrupted = False
        self.report: dict[str, Any] = {
            "termination_time": notice.key,
            "seen_at": iso_ms(notice.seen_at),
            "deadline": iso_ms(self._wall(self._deadline)),
            "started_at": None,
            "finished_at": None,
            "completed": False,
            "deadline_held": None,
            "interrupted": False,
            "current_step": None,
            "steps": [],
            "hooks": [],
            "services": [],
        }

    # -- deadline ---------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        with self._lock:
            return self._deadline

    @property
    def hooks_deadline(self) -> float:
        """When hooks must be done: the deadline less the services' reserve."""
        deadline = self.deadline
        reserve = min(self.settings.services_reserve, 0.25 * (deadline - self._started))
        return deadline - max(reserve, 0.0)

    @property
    def step(self) -> str | None:
        current = self.report["current_step"]
        return current if isinstance(current, str) else None

    def shorten(self, deadline: float) -> None:
        """Bring the deadline forward (SIGTERM during the drain); never pushes it back."""
        with self._lock:
            if deadline < self._deadline:
                self._deadline = deadline
                self.interrupted = True
                self.report["interrupted"] = True
                self.report["deadline"] = iso_ms(self._wall(deadline))

    @staticmethod
    def _wall(mono: float) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=mono - time.monotonic())

    # -- the sequence -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        began = self._started = time.monotonic()
        self._set(started_at=iso_ms(datetime.now(UTC)))
        log.warning(
            "spot termination at %s: draining, deadline in %.1fs",
            self.notice.key, self.deadline - began,
        )
        self._step("stop-new-work", self._stop_new_work)
        self._step("hooks", self._hooks)
        self._step("services", self._services)
        if self.settings.final_action == "poweroff":
            self._step("poweroff", self._poweroff)
        ended = time.monotonic()
        held = ended <= self.deadline
        self._set(
            finished_at=iso_ms(datetime.now(UTC)),
            completed=True,
            deadline_held=held,
            current_step=None,
            seconds=round(ended - began, 3),
        )
        self._save()
        if held:
            log.warning("drain finished in %.2fs, %.1fs before the deadline",
                        ended - began, self.deadline - ended)
        else:
            log.error("drain finished in %.2fs, %.1fs AFTER the deadline",
                      ended - began, ended - self.deadline)
        return self.report

    def _step(self, name: str, action: Callable[[], str | None]) -> None:
        self._set(current_step=name)
        self._save()
        began = time.monotonic()
        error: str | None
        try:
            error = action()
        except Exception as exc:  # one failing step must not cancel the ones after it
            error = f"{type(exc).__name__}: {exc}"
            log.exception("drain step %s failed", name)
        seconds = time.monotonic() - began
        step = {"step": name, "seconds": round(seconds, 3), "ok": error is None, "error": error,
                "within_deadline": time.monotonic() <= self.deadline}
        with self._lock:
            self.report["steps"].append(step)
        log.warning("drain step %s: %s in %.2fs (%.1fs left)", name,
                    "ok" if error is None else error, seconds, self.deadline - time.monotonic())

    def _hooks(self) -> str | None:
        env = {"GUESTAGENT_TERMINATION_TIME": self.notice.key}
        results = run_hooks(
            self.settings.hooks_dir, env, self.settings.hook_timeout,
            deadline=lambda: self.hooks_deadline, kind="spot hook",
        )
        self._set(hooks=[r.as_dict() for r in results])
        bad = [r.name for r in results if not r.ok]
        return f"hooks failed: {', '.join(bad)}" if bad else None

    def _services(self) -> str | None:
        def record(name: str, seconds: float, error: str | None) -> None:
            entry = {"name": name, "seconds": round(seconds, 3), "ok": error is None,
                     "error": error}
            with self._lock:
                self.report["services"].append(entry)
            self._save()

        self._drain_services(self.deadline, record)
        bad = [s["name"] for s in self.report["services"] if not s["ok"]]
        return f"services failed to drain: {', '.join(bad)}" if bad else None

    def _poweroff(self) -> str | None:
        limit = max(self.deadline - time.monotonic(), 5.0)
        res = process.run(self.settings.poweroff_command, timeout=limit)
        if not res.ok:
            return f"{self.settings.poweroff_command[0]} exited {res.returncode}"
        return None

    def _set(self, **fields: Any) -> None:
        with self._lock:
            self.report.update(fields)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the report, safe to read while the drain runs."""
        with self._lock:
            return json.loads(json.dumps(self.report))  # type: ignore[no-any-return]

    def _save(self) -> None:
        try:
            atomic_write(self.path, json.dumps(self.snapshot(), indent=2) + "\n", mode=0o644)
        except OSError as exc:
            log.error("cannot record drain progress in %s: %s", self.path, exc)
