"""Fixtures of the storage tests: our S3 client and transfers on the moto server, and
``rclone serve s3`` with a key of its own. The credential server (``creds``) and buckets
(``bucket``) come from tests/fixtures/cloud.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import KEYS, boto

from guestagent.storage.endpoint import from_url
from guestagent.storage.keys import StaticKeys
from guestagent.storage.s3 import S3Client
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import Options, Transfers


@pytest.fixture
def agent_transfers(transfers: Transfers) -> Transfers:
    """The agent's own transfers (our S3 client) on the moto server, for the facade."""
    return transfers


# -- transfers: our own client on the moto server -----------------------------------------


@pytest.fixture
def bkt(s3: Any) -> str:
    """An empty bucket named ``bkt`` on the (reset) moto server."""
    boto(s3.url).create_bucket(Bucket="bkt")
    return "bkt"


@pytest.fixture
def client(s3: Any) -> Iterator[S3Client]:
    c = S3Client(from_url(s3.url, path_style=True), StaticKeys(KEYS), retries=3,
                 backoff_base=0.05, backoff_max=0.2)
    yield c
    c.close()


@pytest.fixture
def options(tmp_path: Path) -> Options:
    return Options(state_dir=tmp_path / "state", part_size=5 * MiB,
                   multipart_threshold=6 * MiB, concurrency=4)


@pytest.fixture
def transfers(client: S3Client, options: Options) -> Iterator[Transfers]:
    with Transfers(client, options) as t:
        yield t


class RcloneAuth:
    """``rclone serve s3`` that checks signatures against one key pair (test-only keys)."""

    key_id = "AKIDRCLONETEST"
    secret = "rclone-test-secret"

    def __init__(self, oss: Any) -> None:
        self.oss = oss
        self.data = oss.data
        self.endpoint = from_url(oss.url, path_style=True)


@pytest.fixture
def rclone_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RcloneAuth]:
    from guestagent.localcloud.oss import RcloneOss

    # rclone reads --auth-key from its environment (never argv); a list flag's value from
    # the environment is CSV, so the pair is quoted as one item.
    monkeypatch.setenv("RCLONE_AUTH_KEY", f'"{RcloneAuth.key_id},{RcloneAuth.secret}"')
    oss = RcloneOss(tmp_path / "rclone", {"GUESTAGENT_LOCALCLOUD_BUCKETS": "bkt"})
    oss.start()
    try:
        yield RcloneAuth(oss)
    finally:
        oss.stop()
