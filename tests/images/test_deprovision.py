"""``guestagent deprovision`` on an image tree: what goes, what stays, and refusals that
change nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MID = "0123456789abcdef0123456789abcdef"
# guest path -> content: everything here belongs to one instance and must go.
INSTANCE = {
    "/etc/ssh/ssh_host_ed25519_key": "k",
    "/etc/ssh/ssh_host_ed25519_key.pub": "k",
    "/etc/ssh/ssh_host_rsa_key": "k",
    "/etc/ssh/ssh_host_rsa_key.pub": "k",
    "/var/lib/guestagent/userdata/sem/instance-i-1/accounts": "{}",
    "/var/lib/guestagent/userdata/last-run.json": "{}",
    "/var/lib/guestagent/spot/drain.json": "{}",
    "/var/lib/guestagent/daemon.lock": "",
    "/run/guestagent/credentials.sock": "",
    "/root/.alibabacloud/credentials": "[default]\naccess_key_secret = s\n",
    "/var/lib/cloud/instances/i-1/sem/config_ssh": "",
    "/var/lib/cloud/data/instance-id": "i-1",
    "/var/lib/dhcp/dhclient.eth0.leases": "lease {}",
    "/var/lib/NetworkManager/internal-abc-eth0.lease": "x",
    "/root/.bash_history": "ls",
    "/home/ops/.bash_history": "sudo -i",
    "/home/ops/.python_history": "1+1",
    "/var/log/guestagent.log": "log",
    "/var/log/cloud-init.log": "log",
    "/var/log/cloud-init-output.log": "log",
    f"/var/log/journal/{MID}/system.journal": "j",
}
# Image configuration that must stay.
KEEP = {
    "/etc/os-release": "ID=debian\n",
    "/etc/hostname": "localhost\n",
    "/etc/ssh/sshd_config": "PermitRootLogin no\n",
    "/etc/guestagent/agent.toml":
        '[credentials]\nprofile_file = "/root/.alibabacloud/credentials"\n',
    "/etc/guestagent/spot.d/10-flush": "#!/bin/sh\n",
    "/var/lib/cloud/seed/nocloud/user-data": "#cloud-config\n",
    "/home/ops/.profile": "PATH=$PATH\n",
    "/var/log/apt/history.log": "apt",
}


def make_tree(root: Path) -> Path:
    for guest, text in {**INSTANCE, **KEEP, "/etc/machine-id": MID + "\n"}.items():
        path = root / guest.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.symlink("/var/lib/cloud/instances/i-1", root / "var/lib/cloud/instance")
    return root


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            text = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_text()
            out[str(p.relative_to(root))] = text
    return out


def deprovision(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guestagent", "deprovision", *args],
        capture_output=True, text=True, timeout=120, input=stdin,
    )


def test_dry_run_lists_everything_and_changes_nothing(tmp_path):
    root = make_tree(tmp_path / "img")
    before = snapshot(root)
    res = deprovision("--root", str(root), "--dry-run", "--user")
    assert res.returncode == 0, res.stderr
    for guest in INSTANCE:
        # every item, or the directory that holds it, is named
        assert any(line.split()[1] in (guest, *map(str, Path(guest).parents))
                   for line in res.stdout.splitlines()[1:]), guest
    assert "/etc/machine-id" in res.stdout
    assert snapshot(root) == before


def test_yes_removes_instance_state_and_keeps_the_image(tmp_path):
    root = make_tree(tmp_path / "img")
    res = deprovision("--root", str(root), "--yes")
    assert res.returncode == 0, res.stderr
    left = snapshot(root)
    for guest in INSTANCE:
        assert guest.lstrip("/") not in left, guest
    for guest, text in KEEP.items():
        assert left[guest.lstrip("/")] == text
    # emptied, not deleted: systemd makes a new id at the next boot
    assert left["etc/machine-id"] == ""
    assert not os.path.lexists(root / "var/lib/cloud/instance")
    assert (root / "var/lib/guestagent").is_dir()
    # a second run finds nothing left to do
    again = deprovision("--root", str(root), "--yes")
    assert again.returncode == 0 and "0 item(s)" in again.stdout


def test_not_a_root_file_system_is_refused(tmp_path):
    root = make_tree(tmp_path / "img")
    (root / "etc/os-release").unlink()
    before = snapshot(root)
    res = deprovision("--root", str(root), "--yes")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "os-release" in res.stderr
    assert snapshot(root) == before


def test_read_only_root_is_refused_whole(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    root = make_tree(tmp_path / "img")
    before = snapshot(root)
    # Only /var read-only: the items in /etc would be removable, yet nothing may go.
    var = root / "var"
    subprocess.run(["mount", "--bind", str(var), str(var)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(var)], check=True)
        res = deprovision("--root", str(root), "--yes")
    finally:
        subprocess.run(["umount", str(var)], check=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "read-only" in res.stderr
    assert "nothing was removed" in res.stderr
    assert snapshot(root) == before


def test_asks_and_refuses_without_a_terminal(tmp_path):
    root = make_tree(tmp_path / "img")
    before = snapshot(root)
    res = deprovision("--root", str(root), stdin="y\n")
    assert res.returncode == 2 and "--yes" in res.stderr
    assert snapshot(root) == before


def test_running_root_needs_yes():
    # Refused before anything is planned for removal: the test machine keeps its keys.
    res = deprovision("--root", "/", stdin="y\n")
    assert res.returncode == 2
    assert "running system" in res.stderr and "--yes" in res.stderr
