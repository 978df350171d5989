"""The ordered drain of the instance, against a deadline, resumable after kill -9.

A capability asks for a drain with a :class:`DrainRequest` (the spot watcher does on a
termination notice); the daemon runs it. Steps: stop taking new work -> the request's hooks
in name order -> services drain, dependents first -> optional final command. Each step's
duration and whether the deadline held are logged and kept in ``<state_dir>/drain.json``,
rewritten before and after every hook: after kill -9 and a restart, the same request (same
``key``) resumes. Hooks that finished are not run again; the one that was running is run
again with ``GUESTAGENT_DRAIN_ATTEMPT`` raised (so it can be idempotent); the deadline is
still the original one, as it comes from the request's wall-clock time.

This module sits below both the daemon and the capabilities: it names none of them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.files import atomic_write
from guestagent.hooks import SKIPPED, HookResult, hook_env, list_hooks, run_hook

log = logging.getLogger(__name__)

MIN_BUDGET = 1.0  # a request seen too late still gets this long to flush what it can
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
HOOK_GROUP = "drain"  # process group tag of the drain's hooks (ended at its deadline)
ATTEMPT_ENV = "GUESTAGENT_DRAIN_ATTEMPT"

StepCallback = Callable[[str, float, str | None], None]


def iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime(TIME_FORMAT)


def iso_ms(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DrainRequest:
    """What to drain for, and how. ``key`` names the event: a restart that sees the same
    key again resumes (or, once completed, does not repeat) the drain."""

    key: str
    reason: str
    deadline_at: datetime  # UTC aware: everything done by then
    seen_at: datetime
    hooks_dir: Path | None = None
    hook_env: Mapping[str, str] = field(default_factory=dict)
    hook_timeout: float = 60.0
    # Hooks end this long before the deadline (at most a quarter of the drain's time) so the
    # services' own drain still has time after them.
    services_reserve: float = 15.0
    final_command: tuple[str, ...] = ()
    exit_after: bool = True
    facts: Mapping[str, str] = field(default_factory=dict)  # copied into the report


def state_file(state_dir: Path) -> Path:
    return state_dir / "drain.json"


def load_report(state_dir: Path) -> dict[str, Any] | None:
    """The last drain's report, or None (absent or unreadable)."""
    try:
        data = json.loads(state_file(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def drained(state_dir: Path, key: str) -> bool:
    """Whether the drain for ``key`` already completed (before a restart)."""
    report = load_report(state_dir)
    return bool(report and report.get("key") == key and report.get("completed"))


class Drain:
    def __init__(
        self,
        request: DrainRequest,
        state_dir: Path,
        *,
        stop_new_work: Callable[[], None],
        drain_services: Callable[[float, StepCallback], None],
    ) -> None:
        self.request = request
        self.path = state_file(state_dir)
        self._stop_new_work = stop_new_work
        self._drain_services = drain_services
        self._lock = threading.RLock()  # guards the deadline and the report
        left = (request.deadline_at - datetime.now(UTC)).total_seconds()
        self._deadline = time.monotonic() + max(left, MIN_BUDGET)
        self._started = time.monotonic()
        self.interrupted = False
        prior = load_report(state_dir)
        self.resumed = bool(prior and prior.get("key") == request.key
                            and not prior.get("completed"))
        self.report: dict[str, Any] = {
            **request.facts,
            "key": request.key,
            "reason": request.reason,
            "seen_at": iso_ms(request.seen_at),
            "deadline": iso_ms(request.deadline_at),
            "started_at": None,
            "finished_at": None,
            "completed": False,
            "deadline_held": None,
            "interrupted": False,
            "attempt": 1,
            "current_step": None,
            "running_hook": None,
            "steps": [],
            "hooks": [],
            "services": [],
        }
        if self.resumed and prior is not None:
            self.report["attempt"] = int(prior.get("attempt", 1)) + 1
            self.report["seen_at"] = prior.get("seen_at", self.report["seen_at"])
            self.report["hooks"] = [h for h in prior.get("hooks", []) if isinstance(h, dict)]
            self._in_flight: dict[str, Any] | None = prior.get("running_hook")
        else:
            self._in_flight = None

    # -- deadline ---------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        with self._lock:
            return self._deadline

    @property
    def hooks_deadline(self) -> float:
        """When hooks must be done: the deadline less the services' reserve."""
        deadline = self.deadline
        reserve = min(self.request.services_reserve, 0.25 * (deadline - self._started))
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
        log.warning("%s: draining%s, deadline in %.1fs", self.request.reason,
                    " (resumed after a restart)" if self.resumed else "", self.deadline - began)
        self._step("stop-new-work", self._stop_new_work)
        self._step("hooks", self._hooks)
        self._step("services", self._services)
        if self.request.final_command:
            self._step("final", self._final)
        ended = time.monotonic()
        held = ended <= self.deadline
        self._set(finished_at=iso_ms(datetime.now(UTC)), completed=True, deadline_held=held,
                  current_step=None, seconds=round(ended - began, 3))
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
        req = self.request
        if req.hooks_dir is None:
            return None
        finished = {h.get("name") for h in self.report["hooks"]}
        flight = self._in_flight or {}
        env = hook_env(req.hook_env)
        for hook in list_hooks(req.hooks_dir):
            if hook.name in finished:
                log.info("drain hook %s already ran before the restart: not run again",
                         hook.name)
                continue
            remaining = self.hooks_deadline - time.monotonic()
            if remaining <= 0:
                log.warning("drain hook %s skipped: the deadline has passed", hook.name)
                self._hook_done(HookResult(hook.name, None, 0.0, error=SKIPPED), 0)
                continue
            attempt = int(flight.get("attempt", 0)) + 1 if flight.get("name") == hook.name else 1
            self._set(running_hook={"name": hook.name, "attempt": attempt})
            self._save()
            # A hook dies with the agent: after a restart it is run again, never twice at once.
            result = run_hook(hook, {**env, ATTEMPT_ENV: str(attempt)},
                              min(req.hook_timeout, remaining), "drain hook", group=HOOK_GROUP,
                              die_with_parent=True)
            self._hook_done(result, attempt)
        bad = [h["name"] for h in self.report["hooks"] if not h.get("ok")]
        return f"hooks failed: {', '.join(bad)}" if bad else None

    def _hook_done(self, result: HookResult, attempt: int) -> None:
        with self._lock:
            self.report["hooks"].append({**result.as_dict(), "attempt": attempt})
            self.report["running_hook"] = None
        self._save()

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

    def _final(self) -> str | None:
        argv = self.request.final_command
        limit = max(self.deadline - time.monotonic(), 5.0)
        res = process.run(argv, timeout=limit)
        if not res.ok:
            return f"{argv[0]} exited {res.returncode}"
        return None

    def end_hooks(self) -> int:
        """Kill the drain's own hooks still running (and what they left behind)."""
        return process.end_group(HOOK_GROUP)

    def _set(self, **fields: Any) -> None:
        with self._lock:
            self.report.update(fields)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the report, safe to read while the drain runs."""
        with self._lock:
            return json.loads(json.dumps(self.report))  # type: ignore[no-any-return]

    def _save(self) -> None:
        # Under the lock: a late service drain saving an older snapshot must never land
        # after the final one.
        with self._lock:
            try:
                atomic_write(self.path, json.dumps(self.report, indent=2) + "\n", mode=0o644)
            except OSError as exc:
                log.error("cannot record drain progress in %s: %s", self.path, exc)
