"""`guestagent migrate start` under a real booted systemd 252: the daemon runs the migration
as a transient unit, so an agent restart neither stops nor duplicates it, and a reboot in
the middle of the transfer resumes it at boot without sending again what had arrived.

The guest shares the host's network: it reaches the local ECS API on loopback and the
intermediate instance (a network namespace with sshd) at its veth address.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from guestagent.localcloud.ecsapi import AccessKey, Account, EcsApi
from guestagent.localcloud.hosts import leftover_namespaces
from guestagent.migrate.transfer import PARTIAL_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ACCESS_ID = "LTAI5tSystemMigrate1"
SECRET = "s3cr3t-System-Migrate-0001"
CONFIG = "/root/go2aliyun/user_config.json"
ROOT = "/srv/server"
JOBS = "/var/lib/guestagent/migrate"
UNIT = "guestagent-migrate.service"
KVER = "6.1.0-13-amd64"
PAYLOAD = 64 * 2**20
LIMIT_KBPS = 2000  # ~33 s for the payload: time to restart the agent or reboot mid-file


@pytest.fixture
def ecs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EcsApi]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    subnet = f"10.213.{secrets.randbelow(256)}.0/24"
    current = os.environ.get("TESTGUARD_ALLOW_CIDRS", "")
    monkeypatch.setenv("TESTGUARD_ALLOW_CIDRS", ",".join(filter(None, [current, subnet])))
    api = EcsApi(Account(keys={ACCESS_ID: AccessKey(ACCESS_ID, SECRET)}), tmp_path / "cloud",
                 subnet).start()
    yield api
    api.stop()
    assert set(api.cloud.namespaces) & set(leftover_namespaces()) == set()


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def _server(guest: Any) -> bytes:
    """A small Debian-like tree the pre-checks accept, and the payload; its bytes."""
    root = guest.path(ROOT)
    _write(root / "etc/os-release", 'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n')
    _write(root / "etc/fstab", "UUID=5f1c7a3e / ext4 errors=remount-ro 0 1\n")
    _write(root / "etc/selinux/config", "SELINUX=disabled\n")
    _write(root / "boot/grub/grub.cfg", "set default=0\n")
    _write(root / f"lib/modules/{KVER}/modules.builtin",
           "kernel/drivers/block/virtio_blk.ko\nkernel/drivers/net/virtio_net.ko\n"
           "kernel/drivers/virtio/virtio_pci.ko\n")
    payload = os.urandom(PAYLOAD)
    _write(root / "srv/payload.bin", payload)
    config = {"access_id": ACCESS_ID, "secret_key": SECRET, "region_id": "cn-hangzhou",
              "image_name": "SYSTEM_MIGRATE_01", "system_disk_size": 40, "platform": "Debian",
              "architecture": "x86_64", "data_disks": [], "bandwidth_limit": LIMIT_KBPS}
    _write(guest.path(CONFIG), json.dumps(config), mode=0o600)
    return payload


def _guest(emulator: Any, guest_factory: Any, api: EcsApi) -> tuple[Any, bytes]:
    toml = (f'[migrate]\nendpoint = "{api.url}"\njob_poll_interval = 0.5\n'
            "retry_backoff = 0.5\n")
    guest = guest_factory(emulator, config=toml)
    payload = _server(guest)
    guest.boot()
    guest.wait_unit("guestagent.service")
    return guest, payload


def _job(guest: Any) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(guest.path(f"{JOBS}/job.json").read_text())  # type: ignore[no-any-return]
    return {}


def _state(guest: Any) -> dict[str, Any]:
    path = guest.path(str(Path(CONFIG).parent / "client_data"))
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    return {}


def _arrived(api: EcsApi) -> int:
    """Bytes of the payload on the intermediate instance (rsync's temporary file)."""
    for inst in list(api.cloud.instances.values()):
        with contextlib.suppress(OSError):
            for entry in (inst.root / "srv").iterdir():
                if entry.name.startswith(".payload.bin."):
                    return entry.stat().st_size
    return 0


def _start(guest: Any) -> str:
    """`migrate start` as the user runs it; waits for the daemon's unit; its MainPID."""
    res = guest.run(["guestagent", "migrate", "start", "--config", CONFIG, "--root", ROOT],
                    timeout=120)
    assert res.ok, res.text() + res.stderr.decode(errors="replace")
    wait_for(lambda: _job(guest).get("state") == "running", timeout=120, step=0.5)
    props = guest.wait_unit(UNIT)
    pid = guest.show(UNIT, "MainPID")["MainPID"]
    assert props["ActiveState"] == "active" and pid != "0"
    # The run is the unit's, outside the agent's cgroup.
    cgroup = guest.run(["cat", f"/proc/{pid}/cgroup"]).text()
    assert UNIT in cgroup and "/guestagent.service" not in cgroup
    return str(pid)


def _progress(guest: Any) -> str | None:
    out = guest.run(["guestagent", "migrate", "status", "--config", CONFIG]).text()
    return next((ln for ln in out.splitlines() if ln.startswith("progress: ")), None)


def _finished(guest: Any, api: EcsApi, payload: bytes) -> dict[str, Any]:
    wait_for(lambda: _job(guest).get("state") in ("finished", "not finished"), timeout=900,
             step=1.0)
    log = guest.path(f"{JOBS}/run.log").read_text(errors="replace")
    assert _job(guest)["state"] == "finished", log[-2000:]
    assert "Goto Aliyun Finished!" in log.splitlines()
    status = json.loads(guest.run(["guestagent", "migrate", "status", "--config", CONFIG,
                                   "--json"]).stdout)
    assert status["result"] == "finished" and status["image_id"]
    image = next(i for i in api.cloud.image_records())
    got = (Path(str(image["Path"])) / "system/srv/payload.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert api.calls.count("CreateInstance") == 1 and api.calls.count("CreateImage") == 1
    # Neither the secret nor the one-time SSH key reached the guest's journal.
    journal = guest.journal()
    assert SECRET not in journal and "PRIVATE KEY" not in journal
    return status


def test_migrate_start_survives_an_agent_restart(emulator: Any, guest_factory: Any,
                                                 ecs: EcsApi) -> None:
    guest, payload = _guest(emulator, guest_factory, ecs)
    pid = _start(guest)
    line = wait_for(lambda: _progress(guest), timeout=300, step=0.5)
    assert "transfer:system" in line
    shown = guest.run(["guestagent", "migrate", "status", "--config", CONFIG]).text()
    assert f"daemon: running as {UNIT}" in shown, shown
    wait_for(lambda: _arrived(ecs) >= 4 * 2**20, timeout=300, step=0.2)

    assert guest.systemctl("restart", "guestagent.service", timeout=120).ok
    guest.wait_unit("guestagent.service")
    assert _arrived(ecs) < PAYLOAD, "the transfer ended before the restart: nothing proven"
    # The same run goes on (same process), the new agent adopts it and starts no other.
    assert guest.show(UNIT, "ActiveState", "MainPID") == {"ActiveState": "active",
                                                          "MainPID": pid}
    status = _finished(guest, ecs, payload)
    assert _job(guest)["launches"] == 1
    assert status["transfers"]["transfer:system"]["attempts"] == 1
    assert "migration interrupted" not in guest.journal("-u", "guestagent.service")


def test_migrate_start_resumes_after_a_reboot(emulator: Any, guest_factory: Any,
                                             ecs: EcsApi) -> None:
    guest, payload = _guest(emulator, guest_factory, ecs)
    _start(guest)
    wait_for(lambda: _arrived(ecs) >= 8 * 2**20, timeout=300, step=0.2)

    guest.run(["systemctl", "reboot"])
    assert guest.wait_exit(300) == 133  # nspawn's exit code for a guest reboot
    inst = next(iter(ecs.cloud.instances.values()))
    kept = inst.root / "srv" / PARTIAL_DIR / "payload.bin"
    wait_for(kept.exists, timeout=60)  # the receiver kept what had arrived
    arrived = kept.stat().st_size
    assert 8 * 2**20 <= arrived < PAYLOAD
    assert _state(guest)["result"] == "running"

    guest.boot()  # the same disk boots again
    guest.wait_unit("guestagent.service")
    status = _finished(guest, ecs, payload)
    assert "migration interrupted (reboot): resuming it" in guest.journal(
        "-u", "guestagent.service")
    sent = status["transfers"]["transfer:system"]
    print(f"\nrebooted with {arrived / 2**20:.1f} MiB of {PAYLOAD / 2**20:.0f} MiB on the "
          f"instance; after the reboot {sent['literal'] / 2**20:.1f} MiB were sent, "
          f"{sent['matched'] / 2**20:.1f} MiB matched")
    # What had arrived was matched, not sent again.
    assert sent["matched"] >= arrived - 2**20
    assert sent["literal"] <= PAYLOAD - arrived + 2**20
