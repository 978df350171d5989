"""Fixtures of the migration tests: the local ECS API with real test hosts (network namespace
+ sshd + rsync), a prepared server tree, and the client run as the user runs it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mig_fixtures import ACCESS_ID, SECRET, Cloud
from mig_tree import build_tree

from guestagent.localcloud.ecsapi import AccessKey, Account, EcsApi
from guestagent.localcloud.hosts import leftover_namespaces


def _need() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "rsync", "ssh", "setfacl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/bootstrap)")
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("sshd not installed (openssh-server)")


@pytest.fixture
def ecs_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[..., Cloud]]:
    """Start local ECS APIs whose instances live in a fresh /24; the network guard is told
    to let exactly that subnet through."""
    _need()
    made: list[EcsApi] = []

    def make(**account: Any) -> Cloud:
        keys = account.pop("keys", None) or {ACCESS_ID: AccessKey(ACCESS_ID, SECRET)}
        acct = Account(keys=keys, **account)
        subnet = f"10.213.{secrets.randbelow(256)}.0/24"
        current = os.environ.get("TESTGUARD_ALLOW_CIDRS", "")
        monkeypatch.setenv("TESTGUARD_ALLOW_CIDRS", ",".join(filter(None, [current, subnet])))
        workdir = tmp_path / f"cloud{len(made)}"
        api = EcsApi(acct, workdir, subnet).start()
        made.append(api)
        return Cloud(api, acct, workdir)

    yield make
    for api in made:
        api.stop()
    ours = {ns for api in made for ns in api.cloud.namespaces}
    assert ours & set(leftover_namespaces()) == set(), "a test host was left behind"


@pytest.fixture
def ecs(ecs_factory: Callable[..., Cloud]) -> Cloud:
    return ecs_factory()


@pytest.fixture
def server(tmp_path: Path) -> Path:
    """A prepared server tree with a sparse 1 GB file (fast)."""
    return build_tree(tmp_path / "server", big="sparse")


@pytest.fixture
def small_server(tmp_path: Path) -> Path:
    """The same tree without the 1 GB file, for tests about what happens around a transfer."""
    return build_tree(tmp_path / "server", big="none")


@pytest.fixture
def data_disk(server: Path) -> Iterator[Path]:
    """/mnt/disk1 of the server: a real mount point (tmpfs) with files on it."""
    mnt = server / "mnt/disk1"
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "migdisk", str(mnt)], check=True)
    (mnt / "projects").mkdir()
    (mnt / "projects/a.txt").write_text("data disk file\n")
    (mnt / "projects/blob").write_bytes(os.urandom(300_000))
    (mnt / "cache").mkdir()
    (mnt / "cache/junk").write_text("excluded by the user\n")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


