"""The agent baked as on an image boots under a real systemd 252 and serves from there."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# Feed the watchdog often enough to see it fed twice within a test's patience.
FAST_WATCHDOG = "[Service]\nWatchdogSec=4\n"


def test_agent_active_as_notify_and_watchdog_fed(emulator, guest_factory):
    guest = guest_factory(
        emulator,
        files={"/etc/systemd/system/guestagent.service.d/50-test.conf": FAST_WATCHDOG},
    )
    guest.boot()
    props = guest.wait_unit("guestagent.service")
    assert props["SubState"] == "running"
    shown = guest.show("guestagent.service", "Type", "WatchdogUSec", "NRestarts")
    assert shown["Type"] == "notify"
    assert shown["WatchdogUSec"] == "4s"

    def stamp() -> str:
        return guest.show("guestagent.service", "WatchdogTimestampMonotonic")[
            "WatchdogTimestampMonotonic"
        ]

    from polling import wait_for

    first = stamp()
    wait_for(lambda: stamp() != first, timeout=60, step=0.5)
    second = stamp()
    wait_for(lambda: stamp() != second, timeout=60, step=0.5)
    assert guest.show("guestagent.service", "NRestarts")["NRestarts"] == "0"

    status = guest.run(["guestagent", "status", "--json"])
    assert status.ok, status.stderr.decode()
    assert json.loads(status.stdout)
    # Both first-boot stages ran.
    for stage in ("local", "final"):
        assert guest.wait_unit(f"guestagent-firstboot-{stage}.service")["Result"] == "success"


def test_agent_lives_in_its_own_venv(emulator, guest_factory):
    guest = guest_factory(emulator)
    guest.boot()
    link = guest.run(["readlink", "-f", "/usr/local/bin/guestagent"]).text().strip()
    assert link.startswith("/opt/guestagent/")
    # The distribution's Python does not see it (PEP 668: never installed into it).
    assert not guest.run(["/usr/bin/python3", "-c", "import guestagent"]).ok
    assert guest.run(["/opt/guestagent/bin/python", "-c", "import guestagent"]).ok
