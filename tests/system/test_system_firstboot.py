"""First boot of a baked image under a real systemd, against the local cloud: user-data from
the templates takes effect once per instance; the agent serves credentials inside; a spot
notice drains (and powers the guest off) before the deadline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

KEY = (
    Ed25519PrivateKey.generate().public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode() + " ops@test"
)
COUNTER = "/var/lib/ud-runs"
SCRIPT = f"#!/bin/sh\n# per instance: counts its runs\necho run >> {COUNTER}\n"


def cli(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "guestagent", *args], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def render_user_data(tmp: Path) -> bytes:
    """DNS, NTP, apt repository and sudo-account templates plus a script, combined."""
    parts = []
    for name, params in (
        ("dns", ["nameservers=10.0.0.2,10.0.0.3", "search=corp.example"]),
        ("ntp", ["servers=ntp1.aliyun.com,ntp2.aliyun.com"]),
        ("repo", ["kind=apt", "id=corp", "baseurl=http://mirrors.cloud.aliyuncs.com/debian",
                  "suite=bookworm"]),
        ("sudo-account", ["user=ops", f"ssh_keys={KEY}"]),
    ):
        out = tmp / f"{name}.yaml"
        argv = ["userdata", "render", name, "--format", "cloud-config", "-o", str(out)]
        cli(*argv, *(x for p in params for x in ("-p", p)))
        parts.append(str(out))
    script = tmp / "count.sh"
    script.write_text(SCRIPT)
    cli("userdata", "combine", *parts, str(script), "-o", str(tmp / "user-data"))
    return (tmp / "user-data").read_bytes()


def runs(guest) -> int:
    path = guest.path(COUNTER)
    return len(path.read_text().splitlines()) if path.exists() else 0


def drain_report(guest) -> dict:
    """The agent's drain report in the guest's state directory."""
    found = sorted(guest.path("/var/lib/guestagent").rglob("drain.json"))
    assert found, "no drain report in the guest"
    return json.loads(found[0].read_text())


def first_boot_done(guest) -> None:
    """Both first-boot stages (local: configuration; final: scripts) finished well."""
    for stage in ("local", "final"):
        assert guest.wait_unit(f"guestagent-firstboot-{stage}.service")["Result"] == "success"


def booted(guest) -> None:
    guest.boot()
    guest.wait_booted()
    guest.wait_unit("guestagent.service")


def test_user_data_applies_once_per_instance(emulator, guest_factory, tmp_path):
    emulator.set_user_data(render_user_data(tmp_path))
    guest = guest_factory(emulator)
    booted(guest)
    first_boot_done(guest)
    wait_for(lambda: runs(guest) == 1, timeout=120, step=0.2)

    resolv = guest.path("/etc/resolv.conf").read_text()
    assert "nameserver 10.0.0.2" in resolv and "corp.example" in resolv
    chrony = guest.run(["sh", "-c", "cat /etc/chrony/chrony.conf /etc/chrony/*.d/* 2>/dev/null"])
    assert "ntp1.aliyun.com" in chrony.text()
    repo = guest.path("/etc/apt/sources.list.d/corp.list").read_text()
    assert "http://mirrors.cloud.aliyuncs.com/debian bookworm main" in repo
    assert guest.run(["id", "ops"]).ok
    keys = guest.run(["cat", "/home/ops/.ssh/authorized_keys"]).text()
    assert KEY in keys
    owner = guest.run(["stat", "-c", "%U %a", "/home/ops/.ssh/authorized_keys"]).text().split()
    assert owner == ["ops", "600"]
    sudo = guest.run(["sudo", "-l", "-U", "ops"]).text()
    assert "NOPASSWD: ALL" in sudo

    # An admin edits a file user-data wrote; the same instance boots again: nothing reapplied.
    guest.path("/etc/resolv.conf").write_text("nameserver 192.0.2.53\n")
    guest.poweroff()
    booted(guest)
    first_boot_done(guest)
    assert guest.path("/etc/resolv.conf").read_text() == "nameserver 192.0.2.53\n"
    assert runs(guest) == 1

    # The same disk as a new instance: the per-instance parts run again.
    guest.poweroff()
    emulator.set_instance_id("i-bp1newinstance0000001")
    booted(guest)
    wait_for(lambda: runs(guest) == 2, timeout=120, step=0.2)
    assert "nameserver 10.0.0.2" in guest.path("/etc/resolv.conf").read_text()


READ_CREDENTIALS = """
import http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/run/guestagent/credentials.sock")
conn = Unix("localhost")
conn.request("GET", "/v1/credentials/alibaba")
body = json.loads(conn.getresponse().read())
print(body["AccessKeyId"], body["Code"])
"""


def test_program_inside_reads_credentials_and_status_is_healthy(emulator, guest_factory):
    guest = guest_factory(emulator)
    booted(guest)
    # Any program (here the distribution's python3, not the agent's) through the socket.
    res = wait_for(lambda: (r := guest.run(["python3", "-c", READ_CREDENTIALS])).ok and r,
                   timeout=60, step=0.5)
    key_id, code = res.text().split()
    assert code == "Success"
    assert key_id == emulator.current_credentials()["AccessKeyId"]
    status = wait_for(lambda: (r := guest.run(["guestagent", "status"])).ok and r, timeout=60,
                      step=0.5)
    assert "credentials" in status.text()


def test_spot_notice_drains_and_exits_zero_without_restart(emulator, guest_factory):
    hook = "#!/bin/sh\necho drained > /var/lib/spot-hook-ran\n"
    guest = guest_factory(emulator, files={"/etc/guestagent/spot.d/10-mark": hook})
    guest.path("/etc/guestagent/spot.d/10-mark").chmod(0o755)
    booted(guest)
    emulator.schedule_termination(in_seconds=0, release_after=120)
    props = guest.wait_unit("guestagent.service", state="inactive", timeout=90)
    assert props["Result"] == "success"
    shown = guest.show("guestagent.service", "ExecMainStatus", "NRestarts")
    assert shown == {"ExecMainStatus": "0", "NRestarts": "0"}
    assert guest.path("/var/lib/spot-hook-ran").read_text() == "drained\n"
    report = drain_report(guest)
    assert report["completed"] and report["deadline_held"], report


def test_spot_notice_powers_the_guest_off_before_the_deadline(emulator, guest_factory):
    guest = guest_factory(emulator, config='[spot]\nfinal_action = "poweroff"\n')
    booted(guest)
    release_after = 120.0
    emulator.schedule_termination(in_seconds=0, release_after=release_after)
    noticed = time.monotonic()
    code = guest.wait_exit(timeout=release_after)
    assert code is not None, "the guest was still running at the release time"
    assert time.monotonic() - noticed < release_after
    report = drain_report(guest)
    assert report["completed"] and report["deadline_held"], report


def test_deprovision_in_the_booted_guest_leaves_a_clean_image(emulator, guest_factory, tmp_path):
    emulator.set_user_data(render_user_data(tmp_path))
    guest = guest_factory(emulator)
    booted(guest)
    wait_for(lambda: runs(guest) == 1, timeout=120, step=0.2)
    assert guest.run(["id", "ops"]).ok
    # As the Packer template does: stop the agent, then deprovision last.
    assert guest.systemctl("stop", "guestagent.service").ok
    refused = guest.run(["guestagent", "deprovision", "--user"])
    assert refused.returncode == 2 and "--yes" in refused.stderr.decode()
    res = guest.run(["guestagent", "deprovision", "--yes", "--user"])
    assert res.returncode == 0, res.stderr.decode()
    assert not guest.run(["id", "ops"]).ok
    assert not guest.path("/home/ops").exists()
    assert not guest.path("/etc/sudoers.d/90-guestagent-users").exists()
    assert guest.path("/etc/machine-id").read_text() == ""
    assert list(guest.path("/var/lib/guestagent").iterdir()) == []
    # What the image keeps: the admin's sudo still parses, the agent is still enabled.
    assert guest.run(["visudo", "-c"]).ok
    assert guest.systemctl("is-enabled", "guestagent.service").text().strip() == "enabled"
