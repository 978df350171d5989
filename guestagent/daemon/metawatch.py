"""The "metadata" service: checks now and then that the metadata service answers, so
``guestagent status`` can say so (other services fetch what they need themselves)."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from guestagent.daemon.service import Service
from guestagent.metadata.client import MetadataClient
from guestagent.metadata.errors import MetadataError

log = logging.getLogger(__name__)


class MetadataWatch(Service):
    name = "metadata"

    def __init__(self, client: MetadataClient, interval: float) -> None:
        self.client = client
        self.interval = interval
        self.instance_id: str | None = None
        self.last_ok: datetime | None = None
        self.last_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.check()
            stop.wait(self.interval)

    def check(self) -> bool:
        try:
            # Uncached on purpose: this is the reachability check.
            instance_id = self.client.get_fresh("meta-data/instance-id")
        except MetadataError as exc:
            if self.last_error != str(exc):
                log.warning("metadata service check failed: %s", exc)
            self.last_error = str(exc)
            return False
        if self.last_error is not None:
            log.info("metadata service answers again")
        if instance_id and self.instance_id and instance_id.strip() != self.instance_id:
            log.warning("instance id changed from %s to %s", self.instance_id, instance_id.strip())
        self.instance_id = instance_id.strip() if instance_id else None
        self.last_ok = datetime.now(UTC)
        self.last_error = None
        return True

    def status(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "last_ok": self.last_ok.strftime("%Y-%m-%dT%H:%M:%SZ") if self.last_ok else None,
            "last_error": self.last_error,
        }

    def healthy(self) -> bool:
        return self.last_error is None
