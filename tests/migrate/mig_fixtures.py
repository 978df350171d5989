"""Helpers of the migration tests: the client run as the user runs it, against a local cloud."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mig_tree import user_config

from guestagent.localcloud.ecsapi import Account, EcsApi

ACCESS_ID = "LTAI5tMigrateTest01"
SECRET = "s3cr3t-Migrate-Key-0001"


@dataclass
class Cloud:
    api: EcsApi
    account: Account
    workdir: Path

    @property
    def url(self) -> str:
        return self.api.url


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
