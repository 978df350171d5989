"""Watch ``maintenance/active-system-events`` and run ``maintenance.d`` hooks once per event.

Event ids already handled are kept under the state dir, so a restart does not run the
hooks of an event a second time.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from guestagent.drain import iso, iso_ms
from guestagent.files import atomic_write
from guestagent.hooks import run_hooks
from guestagent.metadata.errors import MetadataError
from guestagent.metadata.models import MaintenanceEvent
from guestagent.service import Service
from guestagent.spot.settings import SpotSettings
from guestagent.throttle import ErrorThrottle

log = logging.getLogger(__name__)

KEEP_IDS = 200  # handled ids remembered; events are few and short-lived


class EventSource(Protocol):
    def maintenance_events(self) -> list[MaintenanceEvent]: ...


class MaintenanceWatcher(Service):
    name = "maintenance"

    def __init__(
        self,
        client: EventSource,
        settings: SpotSettings,
        state_dir: Path,
        draining: threading.Event | None = None,
        error_period: float = 300.0,
    ) -> None:
        self.client = client
        self.settings = settings
        # One hook at a time may run its whole timeout between two heartbeats.
        self.heartbeat_timeout = settings.hook_timeout + settings.maintenance_interval + 60
        self.path = state_dir / "spot" / "maintenance.json"
        self.draining = draining or threading.Event()
        self._throttle = ErrorThrottle(error_period)
        self._handled: list[str] = self._load()
        self.active: list[str] = []
        self.last_poll: datetime | None = None
        self.last_error: str | None = None
        self.hooks_run = 0

    def _load(self) -> list[str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        ids = data.get("handled") if isinstance(data, dict) else None
        return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll()
            self.wait(stop, self.settings.maintenance_interval)

    def poll(self) -> list[str]:
        """One poll; returns the ids of the events whose hooks ran now."""
        try:
            events = self.client.maintenance_events()
        except MetadataError as exc:
            self.last_error = str(exc)
            more = self._throttle.suffix(str(exc))
            if more is not None:
                log.warning("maintenance poll failed: %s%s", exc, more)
            return []
        self.last_poll = datetime.now(UTC)
        self.last_error = None
        self.active = [e.event_id for e in events]
        ran = []
        for event in events:
            if event.event_id in self._handled or self.draining.is_set():
                continue
            log.warning("maintenance event %s (%s) not before %s", event.event_id, event.code,
                        iso(event.not_before) if event.not_before else "-")
            env = {
                "GUESTAGENT_EVENT_ID": event.event_id,
                "GUESTAGENT_EVENT_CODE": event.code,
                "GUESTAGENT_EVENT_NOT_BEFORE": iso(event.not_before) if event.not_before else "",
            }
            results = run_hooks(self.settings.maintenance_hooks_dir, env,
                                self.settings.hook_timeout, kind="maintenance hook",
                                group="maintenance", progress=self.beat)
            self.hooks_run += len(results)
            self._handled = [*self._handled, event.event_id][-KEEP_IDS:]
            self._save()
            ran.append(event.event_id)
        return ran

    def _save(self) -> None:
        try:
            atomic_write(self.path, json.dumps({"handled": self._handled}) + "\n")
        except OSError as exc:
            log.error("cannot record handled maintenance events in %s: %s", self.path, exc)

    def problem(self) -> str | None:
        return f"maintenance poll failing: {self.last_error}" if self.last_error else None

    def status(self) -> dict[str, Any]:
        return {
            "active_events": list(self.active),
            "handled_events": len(self._handled),
            "hooks_run": self.hooks_run,
            "last_poll": iso_ms(self.last_poll) if self.last_poll else None,
            "last_error": self.last_error,
        }
