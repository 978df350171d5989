"""The "metadata" service: whether the metadata service answers, as the last real request
of any service said (the spot poll asks every second). It makes its own check only when
nothing else asked for ``interval`` seconds, so its state is never older than that."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from guestagent.metadata.client import MetadataClient
from guestagent.metadata.errors import MetadataError
from guestagent.service import Service

log = logging.getLogger(__name__)


class MetadataWatch(Service):
    name = "metadata"

    def __init__(self, client: MetadataClient, interval: float) -> None:
        self.client = client
        self.interval = interval
        self.instance_id: str | None = None
        self._warned: str | None = None

    def run(self, stop: threading.Event) -> None:
        step = min(self.interval, 5.0)
        while not stop.is_set():
            if self._quiet_for() >= self.interval:
                self.check()
            self._log_change()
            self.wait(stop, step)

    def _quiet_for(self) -> float:
        marks = [m for m in (self.client.last_ok, self.client.last_error_at) if m is not None]
        return time.monotonic() - max(marks) if marks else float("inf")

    def check(self) -> bool:
        try:
            # Uncached on purpose: this is the reachability check.
            instance_id = self.client.get_fresh("meta-data/instance-id")
        except MetadataError:
            return False
        value = instance_id.strip() if instance_id else None
        if value and self.instance_id and value != self.instance_id:
            log.warning("instance id changed from %s to %s", self.instance_id, value)
        self.instance_id = value
        return True

    def _log_change(self) -> None:
        error = self.client.last_error
        if error != self._warned:
            if error is not None:
                log.warning("metadata service failing: %s", error)
            elif self._warned is not None:
                log.info("metadata service answers again")
            self._warned = error

    def status(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "last_ok": _wall(self.client.last_ok),
            "last_error": self.client.last_error,
            "last_error_at": _wall(self.client.last_error_at) if self.client.last_error else None,
        }

    def problem(self) -> str | None:
        error = self.client.last_error
        return f"metadata service failing: {error}" if error else None


def _wall(mono: float | None) -> str | None:
    if mono is None:
        return None
    when = datetime.now(UTC) - timedelta(seconds=time.monotonic() - mono)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
