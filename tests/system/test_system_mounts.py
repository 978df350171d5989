"""An OSS mount declared in ``[storage]`` under a real systemd 252: made at start (rclone in
its own transient unit, reading keys from the credential listener that guestagent.socket
holds), readable, kept across ``systemctl restart`` and a kill -9 of the agent (the same
rclone adopted, never a second mount, a reader inside it undisturbed), remade when its
rclone is killed, gone after ``systemctl stop``; made again at start and gone after a spot
drain."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from guestagent.localcloud.oss import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DEST = "/mnt/in"
DATA = b"input for the task\n"
AGENT = "guestagent.service"


def mount_row(guest: Any) -> dict[str, Any]:
    res = guest.run(["guestagent", "status", "--json"], timeout=60)
    if not res.stdout:
        return {}
    rows = json.loads(res.stdout).get("storage", {}).get("mounts", [])
    return next((r for r in rows if r.get("dest") == DEST), {})


def healthy(guest: Any) -> dict[str, Any]:
    row: dict[str, Any] = wait_for(lambda: (r := mount_row(guest)).get("health") == "ok" and r,
                                   timeout=180, step=0.5, tolerate=(ValueError,))
    return row


def mount_unit(guest: Any) -> tuple[str, int]:
    """The rclone unit (exactly one) and its main pid."""
    out = guest.systemctl("list-units", "--plain", "--no-legend", "--state=active",
                          "guestagent-mount-*").text().split("\n")
    units = [line.split()[0] for line in out if line.strip()]
    assert len(units) == 1, units
    return units[0], int(guest.show(units[0], "MainPID")["MainPID"])


def mounts_at_dest(guest: Any) -> int:
    text = guest.run(["cat", "/proc/self/mountinfo"]).text()
    return sum(1 for line in text.splitlines() if line.split()[4] == DEST)


def records(guest: Any) -> list[str]:
    """What the agent keeps about its mounts and their units (records, env files)."""
    out = guest.run(["sh", "-c", "cd /run/guestagent/storage && ls mounts detached"]).text()
    return [name for name in out.split() if name.endswith((".json", ".env"))]


def no_rclone(guest: Any) -> bool:
    # minbase has no procps: read every process's name.
    names = guest.run(["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null"]).text().split()
    return "rclone" not in names


def test_oss_mount_lifecycle_under_systemd(emulator: Any, guest_factory: Any, s3: Any) -> None:
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")
    import boto3

    bucket = "b-" + uuid.uuid4().hex[:12]
    admin = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=bucket)
    admin.put_object(Bucket=bucket, Key="in/data.txt", Body=DATA)
    # rclone is told the credential listener's port once and keeps it across agent
    # restarts: guestagent.socket holds a fixed one (free on this shared host network).
    port = free_port()
    config = (f"[credentials]\ntcp_port = {port}\n"
              f'[storage]\nendpoint = "{s3.url}"\npath_style = true\nregion = "us-east-1"\n'
              f'mounts = ["oss://{bucket}/in/:{DEST}"]\nmount_check_interval = 1.0\n'
              "mount_ready_timeout = 60.0\n")
    files = {
        "/etc/systemd/system/guestagent.socket.d/40-test.conf":
            "[Socket]\nListenStream=\nListenStream=/run/guestagent/credentials.sock\n"
            f"ListenStream=127.0.0.1:{port}\n",
        "/etc/systemd/system/guestagent.service.d/40-test.conf":
            f"[Service]\nEnvironment=GUESTAGENT_CREDENTIALS_TCP_PORT={port}\n",
    }
    # The container gets the host's /dev/fuse (nspawn makes no FUSE device by itself).
    guest = guest_factory(emulator, config=config, files=files,
                          nspawn_args=("--bind=/dev/fuse",))
    # No rclone copied in: the image's own, installed with the agent (guestagent[mounts]).
    assert guest.path("/opt/guestagent/bin/rclone").is_file()
    assert not guest.path("/usr/local/bin/rclone").exists()
    guest.boot()
    guest.wait_unit(AGENT)

    # Made at start, readable, in its own unit (not the agent's cgroup).
    row = healthy(guest)
    unit, pid = mount_unit(guest)
    assert row["pid"] == pid and row["origin"] == "settings" and not no_rclone(guest)
    assert row["rclone"] == "/opt/guestagent/bin/rclone"
    # The mount's record (its unit's environment file is removed once rclone runs).
    assert len(records(guest)) == 1
    assert guest.run(["cat", f"{DEST}/data.txt"]).stdout == DATA
    listed = json.loads(guest.run(["guestagent", "storage", "mounts", "--json"]).stdout)
    assert [(r["dest"], r["health"], r["pid"]) for r in listed["mounts"]] == [(DEST, "ok", pid)]
    cgroup = guest.run(["cat", f"/proc/{pid}/cgroup"]).text()
    assert unit in cgroup and f"/{AGENT}" not in cgroup
    # A task's process working inside the mount, in a unit of its own.
    assert guest.run(["systemd-run", "--unit=ga-reader", f"--working-directory={DEST}",
                      "sleep", "infinity"]).ok
    reader = int(guest.show("ga-reader.service", "MainPID")["MainPID"])

    def unchanged() -> None:
        row = healthy(guest)
        assert mount_unit(guest) == (unit, pid) and row["pid"] == pid
        assert row["remounts"] == 0 and mounts_at_dest(guest) == 1
        assert guest.run(["cat", f"/proc/{reader}/cwd/data.txt"]).stdout == DATA

    # systemctl restart: no drain; the new agent adopts the same rclone.
    agent_pid = guest.show(AGENT, "MainPID")["MainPID"]
    assert guest.systemctl("restart", AGENT, timeout=120).ok
    guest.wait_unit(AGENT)
    assert guest.show(AGENT, "MainPID")["MainPID"] != agent_pid
    unchanged()
    journal = guest.journal("-u", AGENT)
    assert "restarting: leaving mounts" in journal and "adopted mount" in journal

    # kill -9 of the agent: systemd restarts it (Restart=on-failure); adopted again.
    restarts = int(guest.show(AGENT, "NRestarts")["NRestarts"])
    assert guest.systemctl("kill", "--signal=KILL", "--kill-whom=main", AGENT).ok
    wait_for(lambda: int(guest.show(AGENT, "NRestarts")["NRestarts"]) > restarts,
             timeout=120, step=0.5)
    guest.wait_unit(AGENT)
    unchanged()

    # rclone killed: the agent remounts it (a new transient unit of the same name).
    assert guest.systemctl("kill", "--signal=KILL", unit).ok
    row = wait_for(lambda: (r := mount_row(guest)).get("health") == "ok"
                   and r.get("pid") != pid and r, timeout=120, step=0.5, tolerate=(ValueError,))
    assert row["remounts"] == 1 and mount_unit(guest) == (unit, row["pid"])
    assert mounts_at_dest(guest) == 1
    assert guest.run(["cat", f"{DEST}/data.txt"]).stdout == DATA

    # systemctl stop: a drain — lazy unmount, rclone's unit stopped, nothing left.
    assert guest.systemctl("stop", AGENT, timeout=120).ok
    assert mounts_at_dest(guest) == 0
    wait_for(lambda: no_rclone(guest), timeout=60, step=0.5)
    assert guest.show(unit, "ActiveState")["ActiveState"] != "active"
    assert records(guest) == []

    # Started again: mounted anew; a spot notice drains it away and the agent exits 0.
    assert guest.systemctl("start", AGENT, timeout=120).ok
    healthy(guest)
    assert mount_unit(guest)[1] not in (pid, row["pid"])
    assert guest.run(["cat", f"{DEST}/data.txt"]).stdout == DATA
    emulator.schedule_termination(0, 60)
    props = guest.wait_unit(AGENT, state="inactive", timeout=120)
    assert props["Result"] == "success"
    assert mounts_at_dest(guest) == 0
    wait_for(lambda: no_rclone(guest), timeout=60, step=0.5)
    assert records(guest) == []
