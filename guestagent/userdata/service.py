"""Fetching user-data through the metadata client, and the daemon's first-boot oneshot."""

from __future__ import annotations

import logging
import os
import threading
import time
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


def fetch_waiting(
    client: MetadataClient, settings: UserdataSettings, wait: float
) -> tuple[bytes | None, str, Defaults]:
    """:func:`fetch`, retried with backoff for up to ``wait`` seconds while the service
    cannot be reached (early boot: the network is still coming up). A bad answer is not
    retried; after ``wait`` the last ServiceUnavailable is raised."""
    from guestagent.metadata.errors import ServiceUnavailable

    deadline = time.monotonic() + wait
    delay = 0.5
    while True:
        try:
            return fetch(client, settings)
        except ServiceUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.warning("metadata service not reachable yet (%s); retrying for %.0fs", exc, left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)


FINAL_UNIT = "guestagent-firstboot-final.service"


def units_enabled(root: Path = Path("/")) -> bool:
    """The first-boot units are enabled here: they apply user-data in its two stages, so
    the daemon leaves it to them (scripts would otherwise run in the daemon's cgroup)."""
    wants = root / "etc/systemd/system/multi-user.target.wants" / FINAL_UNIT
    return os.path.lexists(wants)


def state_dir_for(root: Path, configured: Path) -> Path:
    """The configured state dir on the live system; ``/var/lib/guestagent`` of the tree
    (its links followed chroot-style, never out of it) under ``--root``."""
    if root == Path("/"):
        return configured
    from guestagent.userdata.tree import Tree

    return Tree(root).resolve("/var/lib/guestagent")


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
        self.left_to_units = False

    def run(self, stop: threading.Event) -> None:
        if not self.settings.userdata.enabled:
            log.info("user-data handling disabled")
            return
        if units_enabled(self.root):
            self.left_to_units = True
            log.info("user-data left to the first-boot units (%s)", FINAL_UNIT)
            return
        from guestagent.metadata.client import MetadataClient

        client = self.client or MetadataClient(self.settings.metadata)
        try:
            data, instance_id, defaults = fetch(client, self.settings.userdata)
            us = self.settings.userdata
            applier = Applier(
                us,
                root=self.root,
                state_dir=state_dir_for(self.root, self.settings.daemon.state_dir),
                # Another apply (a unit, the CLI) may be running: wait for it.
                lock_wait=3 * us.script_timeout + 60,
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
        if self.left_to_units:
            return {"left_to": FINAL_UNIT}
        if self.error:
            return {"refused": self.error}
        if self.report is None:
            return {}
        return {o.name: o.status for o in self.report.outcomes}

    def healthy(self) -> bool:
        return self.error is None and (self.report is None or not self.report.failed)
