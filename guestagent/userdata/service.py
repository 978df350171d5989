"""Fetching user-data through the metadata client, and the daemon's first-boot oneshot."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guestagent.service import Service
from guestagent.userdata.apply import Applier, Defaults, Report
from guestagent.userdata.errors import UserdataError
from guestagent.userdata.settings import UserdataSettings

if TYPE_CHECKING:
    from guestagent.config import Settings
    from guestagent.metadata.client import MetadataClient

log = logging.getLogger(__name__)


def fetch(client: MetadataClient, settings: UserdataSettings) -> tuple[bytes | None, str, Defaults]:
    """(user-data, instance id, metadata defaults); MetadataError when unreachable."""
    instance_id = client.instance_id()
    data = client.user_data()
    defaults = Defaults(
        nameservers=tuple(client.nameservers()) if settings.default_dns else (),
        ntp_servers=tuple(client.ntp_servers()) if settings.default_ntp else (),
        mirrors=tuple(client.source_address()) if settings.default_mirror else (),
    )
    return data, instance_id, defaults


def state_dir_for(root: Path, configured: Path) -> Path:
    """The configured state dir on the live system; ``<root>/var/lib/guestagent`` in a tree."""
    return configured if root == Path("/") else root / "var/lib/guestagent"


class FirstBootService(Service):
    """Apply the user-data once the daemon starts (a oneshot; semaphores make reruns no-ops)."""

    name = "userdata"
    oneshot = True

    def __init__(
        self, settings: Settings, client: MetadataClient | None = None, root: Path = Path("/")
    ) -> None:
        self.settings = settings
        self.client = client
        self.root = root
        self.report: Report | None = None
        self.error: str | None = None

    def run(self, stop: threading.Event) -> None:
        if not self.settings.userdata.enabled:
            log.info("user-data handling disabled")
            return
        from guestagent.metadata.client import MetadataClient

        client = self.client or MetadataClient(self.settings.metadata)
        try:
            data, instance_id, defaults = fetch(client, self.settings.userdata)
            applier = Applier(
                self.settings.userdata,
                root=self.root,
                state_dir=state_dir_for(self.root, self.settings.daemon.state_dir),
            )
            self.report = applier.apply(data, instance_id, defaults)
        except UserdataError as exc:
            # Refused user-data is the user's to fix; restarting would not help.
            self.error = str(exc)
            log.error("user-data refused: %s", exc)
            return
        finally:
            if self.client is None:
                client.close()
        for outcome in self.report.failed:
            log.error("user-data %s failed: %s", outcome.name, outcome.detail)

    def status(self) -> dict[str, Any]:
        if self.error:
            return {"refused": self.error}
        if self.report is None:
            return {}
        return {o.name: o.status for o in self.report.outcomes}

    def healthy(self) -> bool:
        return self.error is None and (self.report is None or not self.report.failed)
