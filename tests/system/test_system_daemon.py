"""The daemon under a real systemd 252: a deadlocked service leads to a watchdog restart; a
mount the agent makes is seen from another unit; work started outside the agent's life
survives an agent restart (and a watchdog restart) and is re-adopted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PROBE = Path(__file__).with_name("ga_probe.py")
WATCHDOG = "[Service]\nWatchdogSec=4\nRestartSec=1\n"
CONFIG = '[daemon]\nextra_services = ["ga_probe:probe"]\n'


def worker(guest: Any) -> tuple[str, int, str]:
    res = guest.run(["cat", "/run/ga-probe.worker"])
    assert res.ok, res.stderr
    how, pid, init = res.text().split()
    return how, int(pid), init


def alive(guest: Any, pid: int) -> bool:
    return bool(guest.run(["test", "-d", f"/proc/{pid}"]).ok)


def test_daemon_under_systemd(emulator: Any, guest_factory: Any) -> None:
    guest = guest_factory(emulator, config=CONFIG, files={
        "/etc/systemd/system/guestagent.service.d/50-test.conf": WATCHDOG})
    site = sorted(guest.path("/opt/guestagent/lib").glob("python3*/site-packages"))
    assert site, "the agent's venv is not where images/install-agent puts it"
    shutil.copy(PROBE, site[0] / PROBE.name)
    guest.boot()
    guest.wait_unit("guestagent.service")
    how, pid, init = wait_for(lambda: guest.run(["test", "-s", "/run/ga-probe.worker"]).ok
                              and worker(guest), timeout=120)
    assert (how, init) == ("started", "systemd")
    status = json.loads(guest.run(["guestagent", "status", "--json"]).stdout)
    assert status["init"] == "systemd"

    # The mount is the system's: another unit (its own fresh process) sees it.
    seen = guest.run(["systemd-run", "--wait", "--pipe", "--quiet", "--",
                      "findmnt", "-n", "-o", "SOURCE", "/mnt/ga-probe"])
    assert seen.ok and seen.text().strip() == "ga-probe", seen.stderr

    # The worker is in its own transient unit, not in the agent's cgroup.
    cgroup = guest.run(["cat", f"/proc/{pid}/cgroup"]).text()
    assert "guestagent-probe-worker.service" in cgroup and "/guestagent.service" not in cgroup

    # An agent restart (KillMode=mixed) leaves it running; the new agent adopts it.
    before = guest.show("guestagent.service", "MainPID")["MainPID"]
    assert guest.systemctl("restart", "guestagent.service").ok
    guest.wait_unit("guestagent.service")
    assert guest.show("guestagent.service", "MainPID")["MainPID"] != before
    wait_for(lambda: worker(guest)[0] == "adopted", timeout=120)
    assert worker(guest) == ("adopted", pid, "systemd") and alive(guest, pid)

    # A deadlocked service stops the watchdog: systemd restarts the agent.
    restarts = int(guest.show("guestagent.service", "NRestarts")["NRestarts"])
    assert guest.run(["rm", "-f", "/run/ga-probe.worker"]).ok
    assert guest.run(["touch", "/run/ga-probe.hang"]).ok
    wait_for(lambda: int(guest.show("guestagent.service", "NRestarts")["NRestarts"])
             > restarts, timeout=120, step=0.5)
    assert "watchdog" in guest.journal("-u", "guestagent.service").lower()
    guest.wait_unit("guestagent.service")
    wait_for(lambda: guest.run(["test", "-s", "/run/ga-probe.worker"]).ok, timeout=120)
    assert worker(guest) == ("adopted", pid, "systemd") and alive(guest, pid)
