"""Is systemd restarting the agent, or stopping it?

Both arrive as one SIGTERM. They must end differently: a stop (``systemctl stop``, a
system shutdown) drains — outputs flushed, mounts lazily unmounted, tasks ended — while a
restart (``systemctl restart``, an upgrade's ``try-restart``) leaves the work that
outlives the agent (FUSE mounts, task containers: transient units, see
:mod:`guestagent.detached`) to the next agent, which adopts it. systemd says which: while
it stops a unit for a restart, the unit's job is of type ``restart``.

A kill -9, a crash or a watchdog abort runs none of the agent's code: the work stays and
is adopted, exactly as after a restart. Without systemd there is no restart job: a
SIGTERM is a stop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from guestagent import process

log = logging.getLogger(__name__)


def own_unit(cgroup: str | None = None) -> str | None:
    """The systemd service unit this process runs in (from ``/proc/self/cgroup``)."""
    if cgroup is None:
        try:
            cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    for line in cgroup.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers not in ("", "name=systemd"):
            continue
        leaf = path.rstrip("/").rpartition("/")[2]
        if leaf.endswith(".service"):
            return leaf
    return None


def job_type(unit: str) -> str | None:
    """The type of the job systemd is running on ``unit`` (start, stop, restart...)."""
    res = process.run(["systemctl", "list-jobs", "--no-legend", "--plain", "--full", unit],
                      timeout=15)
    if not res.ok:
        return None
    for line in res.text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return None


def restart_pending() -> bool:
    """True when the SIGTERM just received is the first half of a systemd restart."""
    if not process.systemd_running():
        return False
    unit = own_unit()
    if unit is None:
        return False
    kind = job_type(unit)
    log.debug("systemd job on %s: %s", unit, kind)
    return kind in ("restart", "try-restart", "reload-or-restart")


__all__ = ["job_type", "own_unit", "restart_pending"]
