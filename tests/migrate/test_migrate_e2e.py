"""A whole migration against the local cloud: real sshd and rsync in a network namespace,
the received tree compared byte for byte (and metadata) with the server minus the excludes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from mig_fixtures import SECRET, Cloud, make_config, migrate_env, run_migrate
from mig_tree import EXCLUDED_TOP, diff, snapshot

REWRITTEN = ("etc/fstab", "boot/grub/grub.cfg")


def _image(cloud: Cloud, name: str) -> dict[str, object]:
    images = [i for i in cloud.api.cloud.image_records() if i["ImageName"] == name]
    assert len(images) == 1, images
    return images[0]


def test_migration_arrives_byte_for_byte(ecs: Cloud, server: Path, data_disk: Path,
                                         tmp_path: Path) -> None:
    excludes = tmp_path / "rsync_excludes_linux.txt"
    excludes.write_text("# mine\n/mnt/disk1/cache/*\n/srv/shared/*.tmp\n")
    (server / "srv/shared/scratch.tmp").write_text("not wanted\n")
    config = make_config(tmp_path, data_disks=[
        {"data_disk_index": 1, "data_disk_size": 5, "src_path": "/mnt/disk1"}])
    out = run_migrate(ecs, config, server, "--excludes", str(excludes))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().splitlines()[-1] == "Goto Aliyun Finished!"
    # The progress bar (a line per tenth when not on a terminal) follows rsync's own count.
    assert re.search(r"^\s+100% +\d+\.\d MB \S+/s ETA \d+:\d\d:\d\d$", out.stdout, re.M)

    image = _image(ecs, "CLIENT_IMAGE_DEBIAN12_01")
    received = Path(str(image["Path"])) / "system"
    want = snapshot(server, skip=(*EXCLUDED_TOP,))
    got = snapshot(received, skip=(*EXCLUDED_TOP,))
    for entries in (want["entries"], got["entries"]):
        assert isinstance(entries, dict)
        for rel in (*REWRITTEN, "srv/shared/scratch.tmp"):
            entries.pop(rel, None)
    assert diff(want, got) == []
    # Excluded directories arrive empty (the mount points stay), content never travels.
    for top in EXCLUDED_TOP:
        assert (received / top).is_dir() and list((received / top).iterdir()) == [], top
    assert not (received / "srv/shared/scratch.tmp").exists()
    # Sparse files stay sparse on the target.
    big = received / "var/big.img"
    assert big.stat().st_size == 1024**3 and big.stat().st_blocks * 512 < 64 * 1024**2
    # The target boots from the first virtio disk; the data disk is left for the user.
    fstab = (received / "etc/fstab").read_text()
    assert "/dev/vda1\t/\text4" in fstab and "# go2aliyun: not mounted" in fstab
    assert "root=/dev/vda1 ro quiet" in (received / "boot/grub/grub.cfg").read_text()
    # The data disk, minus the user's exclude re-anchored to it.
    disk = Path(str(image["Path"])) / "data1"
    assert (disk / "projects/blob").read_bytes() == (data_disk / "projects/blob").read_bytes()
    assert (disk / "cache").is_dir() and list((disk / "cache").iterdir()) == []
    # The manifest the cloud recorded lists what arrived with sizes and checksums.
    manifest = json.loads((Path(str(image["Path"])) / "manifest.json").read_text())
    assert manifest["var/big.img"]["size"] == 1024**3
    assert manifest["usr/bin/tool"]["sha256"] == got["entries"]["usr/bin/tool"]["sha256"]
    # The intermediate instance is released (its namespace is gone: checked by the fixture).
    assert ecs.api.cloud.instances == {}

    # Logs/ and client_data beside the config; the secret in none of them.
    base = config.parent
    state = json.loads((base / "client_data").read_text())
    assert state["result"] == "finished" and state["image_id"] == image["ImageId"]
    assert state["done"][-1] == "release_instance"
    logs = list((base / "Logs").iterdir())
    assert any(p.name.startswith("go2aliyun_") for p in logs)
    for path in [base / "client_data", *logs, *(base / "client_keys").iterdir()]:
        assert SECRET not in path.read_text(errors="replace"), path
    assert oct((base / "client_keys/id_instance").stat().st_mode & 0o777) == "0o600"
    assert SECRET not in out.stdout + out.stderr

    # status tells the story; a rerun is a no-op that says so.
    status = subprocess.run([sys.executable, "-m", "guestagent", "migrate", "status",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60, env=migrate_env(ecs), check=False)
    assert status.returncode == 0 and "finished" in status.stdout
    assert image["ImageId"] in status.stdout
    again = run_migrate(ecs, config, server)
    assert again.returncode == 0 and "already migrated" in again.stdout
