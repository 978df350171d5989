"""First boot in two stages under a real systemd: the local stage before network-online,
the final stage after it, so a user-data script can start a unit ordered after the
network without stalling."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

USER_DATA = b"""Content-Type: multipart/mixed; boundary="XX"
MIME-Version: 1.0

--XX
Content-Type: text/cloud-config

#cloud-config
ntp: {servers: [ntp1.aliyun.com]}
write_files:
  - path: /etc/systemd/system/ga-after-online.service
    content: |
      [Unit]
      Wants=network-online.target
      After=network-online.target
      [Service]
      Type=oneshot
      RemainAfterExit=yes
      ExecStart=/bin/touch /var/tmp/after-online-ran
--XX
Content-Type: text/x-shellscript

#!/bin/sh
set -e
systemctl daemon-reload
systemctl start ga-after-online.service
echo done > /var/tmp/script-done
--XX--
"""

# A stalled script is killed (and reported failed) well before the test's patience ends.
CONFIG = "[userdata]\nscript_timeout = 90\n"


def _mono(guest, unit: str, prop: str) -> int:
    return int(guest.show(unit, prop)[prop])


def test_two_stages_in_order_and_a_network_online_unit_does_not_stall(emulator, guest_factory):
    emulator.set_user_data(USER_DATA)
    guest = guest_factory(emulator, config=CONFIG)
    guest.boot()
    local = guest.wait_unit("guestagent-firstboot-local.service", timeout=300)
    final = guest.wait_unit("guestagent-firstboot-final.service", timeout=300)
    assert local["Result"] == "success" and final["Result"] == "success"

    # systemd's own clock: local done before network-online.target, final started after.
    local_done = _mono(guest, "guestagent-firstboot-local.service",
                       "ActiveEnterTimestampMonotonic")
    online = _mono(guest, "network-online.target", "ActiveEnterTimestampMonotonic")
    final_start = _mono(guest, "guestagent-firstboot-final.service",
                        "ExecMainStartTimestampMonotonic")
    assert 0 < local_done <= online <= final_start

    # The stage records say the same with UTC times, and what ran where.
    records = {}
    for stage in ("local", "final"):
        records[stage] = json.loads(
            guest.path(f"/var/lib/guestagent/userdata/stage-{stage}.json").read_text())
    assert records["local"]["finished_at"] <= records["final"]["started_at"]
    local_ran = {o["name"]: o["status"] for o in records["local"]["outcomes"]}
    final_ran = {o["name"]: (o["status"], o["exit_code"]) for o in records["final"]["outcomes"]}
    # dns: the metadata service's nameservers (the user-data says nothing of DNS).
    assert local_ran == {"write_files": "applied", "dns": "applied", "ntp": "applied"}
    assert final_ran == {"part-002": ("applied", 0)}
    assert guest.path("/var/tmp/after-online-ran").exists()
    assert guest.path("/var/tmp/script-done").read_text() == "done\n"
    assert "ntp1.aliyun.com" in guest.path("/etc/chrony/chrony.conf").read_text()

    # The daemon left the user-data to the units: the script ran once.
    status = json.loads(guest.run(["guestagent", "status", "--json"]).stdout)
    userdata = [s for s in status["services"] if s["name"] == "userdata"]
    assert not userdata or userdata[0].get("state") != "failed"
