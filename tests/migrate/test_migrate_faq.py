"""Each keyword of the guide's FAQ, produced by its cause, shown with what to do; after the
cause is fixed, a rerun continues and finishes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mig_fixtures import ACCESS_ID, SECRET, Cloud, make_config, run_migrate
from mig_tree import write

from guestagent.localcloud.ecsapi import AccessKey

NOT_FINISHED = "Goto Aliyun Not Finished!"

CLOUD_CAUSES = [
    ("TimeStamp", {"clock_offset": 3600.0}, "set the correct time"),
    ("OperationDenied", {"whitelisted": False}, "Cloud Migration Tool"),
    ("NotEnoughBalance", {"balance": 0.0}, "pay-as-you-go"),
    ("Forbidden.RAM", {"keys": {ACCESS_ID: AccessKey(ACCESS_ID, SECRET, ram_user=True,
                                                     ecs_allowed=False)}},
     "RAM user"),
    ("InvalidImageName.Duplicated", {"images": ["CLIENT_IMAGE_DEBIAN12_01"]},
     "choose another image_name"),
]


def _lines(out: Any) -> list[str]:
    return str(out.stdout).splitlines()


@pytest.mark.parametrize(("keyword", "account", "advice"), CLOUD_CAUSES,
                         ids=[c[0] for c in CLOUD_CAUSES])
def test_cloud_refusals_carry_the_guide_keyword(ecs_factory: Callable[..., Cloud],
                                                small_server: Path, tmp_path: Path, keyword: str,
                                                account: dict[str, Any], advice: str) -> None:
    cloud = ecs_factory(**account)
    config = make_config(tmp_path)
    out = run_migrate(cloud, config, small_server)
    assert out.returncode == 4, out.stdout + out.stderr
    lines = _lines(out)
    assert lines[-2] == NOT_FINISHED and lines[-1].startswith("log: ")
    hit = next(i for i, ln in enumerate(lines) if ln.startswith(f"{keyword}: "))
    assert advice in lines[hit + 1] and "what to do" in lines[hit + 1]
    log = Path(lines[-1][5:]).read_text()
    assert keyword in log and SECRET not in log
    # Nothing was left running in the cloud by a refusal before the transfer.
    assert not any(list(i.root.iterdir()) for i in cloud.api.cloud.instances.values())
    state = json.loads((config.parent / "client_data").read_text())
    assert state["result"] == "not finished" and keyword in state["last_error"][0]

    # The cause goes away (the clock is right, the account approved, topped up, granted,
    # another name chosen): the same command continues and finishes.
    cloud.account.clock_offset, cloud.account.whitelisted = 0.0, True
    cloud.account.balance = 100.0
    cloud.account.keys[ACCESS_ID].ecs_allowed = True
    cloud.account.images.clear()
    if keyword == "InvalidImageName.Duplicated":
        config = make_config(tmp_path, image_name="CLIENT_IMAGE_DEBIAN12_02")
    again = run_migrate(cloud, config, small_server)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _lines(again)[-1] == "Goto Aliyun Finished!"


def test_wrong_platform_is_unknown_error_then_resumes_at_the_image(
        ecs: Cloud, small_server: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, platform="CentOS")
    out = run_migrate(ecs, config, small_server)
    assert out.returncode == 4
    lines = _lines(out)
    hit = next(i for i, ln in enumerate(lines) if ln.startswith("Unknown Error: "))
    assert "platform" in lines[hit + 1]
    state = json.loads((config.parent / "client_data").read_text())
    assert "transfer:system" in state["done"] and state["current"] == "create_image"

    make_config(tmp_path, platform="Debian")
    again = run_migrate(ecs, config, small_server)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[3/6] transfer:system: done earlier" in again.stdout
    assert ecs.api.calls.count("CreateInstance") == 1  # the instance of the first run is used


def test_selinux_enforcing_stops_before_the_cloud_is_asked(ecs: Cloud, small_server: Path,
                                                           tmp_path: Path) -> None:
    write(small_server / "etc/selinux/config", "SELINUX=enforcing\n")
    out = run_migrate(ecs, make_config(tmp_path), small_server)
    assert out.returncode == 4
    assert "check selinux failed: SELinux is enforcing" in out.stdout
    assert "SELINUX=disabled" in out.stdout
    assert ecs.api.calls == []


def test_legacy_grub_warns_then_do_grub_failed_on_the_target(ecs: Cloud, small_server: Path,
                                                             tmp_path: Path) -> None:
    (small_server / "boot/grub/grub.cfg").unlink()
    write(small_server / "boot/grub/menu.lst", "title old\nkernel /vmlinuz root=/dev/sda1\n")
    out = run_migrate(ecs, make_config(tmp_path), small_server)
    assert out.returncode == 4
    assert "GRUB older than 1.9: GRUB 0.97 (legacy) is older than 1.9" in out.stdout
    lines = _lines(out)
    hit = next(i for i, ln in enumerate(lines) if ln.startswith("Do Grub Failed: "))
    assert "GRUB 1.9 or newer" in lines[hit + 1]


def test_unreadable_files_are_permission_denied_with_the_excludes_advice(
        ecs: Cloud, small_server: Path, tmp_path: Path) -> None:
    secret_dir = small_server / "var/lib/vault"
    write(secret_dir / "sealed.key", "x", mode=0o000)
    os.chown(secret_dir / "sealed.key", 4321, 4321)
    config = make_config(tmp_path)
    # Root without the capabilities that bypass file permissions: what a locked-down file
    # (or a FUSE mount root cannot read) looks like to rsync.
    drop = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]
    out = run_migrate(ecs, config, small_server, wrap=prefix)
    assert out.returncode == 4, out.stdout + out.stderr
    lines = _lines(out)
    hit = next(i for i, ln in enumerate(lines) if ln.startswith("Permission denied: "))
    assert "var/lib/vault/sealed.key" in lines[hit]
    assert "rsync_excludes_linux.txt" in lines[hit + 1]

    excludes = tmp_path / "rsync_excludes_linux.txt"
    excludes.write_text("/var/lib/vault/*\n")
    again = run_migrate(ecs, config, small_server, "--excludes", str(excludes), wrap=prefix)
    assert again.returncode == 0, again.stdout + again.stderr
