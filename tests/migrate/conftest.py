"""Fixtures of the migration tests: the local ECS API with real test hosts (network namespace
+ sshd + rsync), a prepared server tree, and the client run as the user runs it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mig_tree import build_tree, user_config

from guestagent.localcloud.ecsapi import AccessKey, Account, EcsApi
from guestagent.localcloud.hosts import leftover_namespaces

ACCESS_ID = "LTAI5tMigrateTest01"
SECRET = "s3cr3t-Migrate-Key-0001"


def _need() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "rsync", "ssh", "setfacl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/bootstrap)")
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("sshd not installed (openssh-server)")


@dataclass
class Cloud:
    api: EcsApi
    account: Account
    workdir: Path

    @property
    def url(self) -> str:
        return self.api.url


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

    before = set(leftover_namespaces())
    yield make
    for api in made:
        api.stop()
    assert set(leftover_namespaces()) - before == set(), "a test host was left behind"


@pytest.fixture
def ecs(ecs_factory: Callable[..., Cloud]) -> Cloud:
    return ecs_factory()


@pytest.fixture
def server(tmp_path: Path) -> Path:
    """A prepared server tree with a sparse 1 GB file (fast)."""
    return build_tree(tmp_path / "server", big="sparse")


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


def migrate_env(cloud: Cloud, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_MIGRATE_")}
    env.update(GUESTAGENT_MIGRATE_ENDPOINT=cloud.url, GUESTAGENT_MIGRATE_RETRY_BACKOFF="0.2")
    env.update(extra)
    return env


def migrate_argv(config: Path, root: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "guestagent", "migrate", "run", "--config", str(config),
            "--root", str(root), *more]


def run_migrate(cloud: Cloud, config: Path, root: Path, *more: str, timeout: float = 900,
                wrap: list[str] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [*(wrap or []), *migrate_argv(config, root, *more)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=migrate_env(cloud, **env), check=False)


def make_config(tmp_path: Path, **overrides: object) -> Path:
    return user_config(tmp_path / "go2aliyun", **overrides)
