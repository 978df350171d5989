"""The units' hardening against what the agent must still do in a booted guest: its hooks
mount file systems the whole system sees, open /dev/fuse (OSS mounts), and write /etc."""

from __future__ import annotations

import pytest
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

HOOK = """#!/bin/sh
set -e
mkdir -p /mnt/ga-hook
mount -t tmpfs -o size=1m ga-hook /mnt/ga-hook
echo seen > /mnt/ga-hook/marker
if exec 3<>/dev/fuse; then echo fuse-ok; else echo fuse-denied; fi > /var/lib/ga-hook-fuse
echo "# written by a hook" > /etc/ga-hook-wrote
"""


def test_hook_mounts_are_seen_by_the_system_and_fuse_opens(emulator, guest_factory):
    guest = guest_factory(
        emulator,
        config="[spot]\nmaintenance_interval = 1\n",
        files={"/etc/guestagent/maintenance.d/10-mount": HOOK},
    )
    guest.path("/etc/guestagent/maintenance.d/10-mount").chmod(0o755)
    guest.extra = ("--bind=/dev/fuse",)
    guest.boot()
    guest.wait_unit("guestagent.service")
    emulator.add_maintenance_event("SystemMaintenance.Reboot", not_before_in=600)
    wait_for(lambda: guest.path("/etc/ga-hook-wrote").exists(), timeout=120, step=0.2)
    # Seen from the guest's own mount namespace (PID 1's), not only inside the agent's unit.
    assert guest.run(["findmnt", "-n", "-o", "FSTYPE", "/mnt/ga-hook"]).text().strip() == "tmpfs"
    assert guest.run(["cat", "/mnt/ga-hook/marker"]).text() == "seen\n"
    assert guest.path("/var/lib/ga-hook-fuse").read_text() == "fuse-ok\n"
