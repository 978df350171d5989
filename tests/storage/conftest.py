"""Fixtures of the storage mount tests: the agent's credential service (against the
emulator) with a loopback TCP listener for rclone, and buckets on the moto server."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import KEYS, boto

from guestagent.config import from_mapping
from guestagent.credentials.service import CredentialService
from guestagent.metadata.client import MetadataClient
from guestagent.storage.endpoint import from_url
from guestagent.storage.keys import StaticKeys
from guestagent.storage.s3 import S3Client
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import Options, Transfers


class Creds:
    def __init__(self, service: CredentialService, token_file: Path) -> None:
        self.service = service
        self.token_file = token_file

    @property
    def aws_url(self) -> str:
        assert self.service.server is not None and self.service.server.tcp_address
        host, port = self.service.server.tcp_address
        return f"http://{host}:{port}/v1/credentials/aws"


@pytest.fixture
def creds(emulator: Any, tmp_path: Path) -> Iterator[Creds]:
    token_file = tmp_path / "creds-token"
    settings = from_mapping({
        "metadata": {"url": emulator.url, "timeout": 1.0, "retries": 1},
        "credentials": {"socket_path": str(tmp_path / "run" / "credentials.sock"),
                        "tcp_enabled": True, "tcp_port": 0, "token_file": str(token_file)},
    })
    client = MetadataClient(settings.metadata)
    service = CredentialService(settings, client)
    stop = threading.Event()
    service.start(stop)
    try:
        import time

        end = time.monotonic() + 20
        while service.rotator.snapshot.state != "ok":
            assert time.monotonic() < end, service.status()
            time.sleep(0.05)
        yield Creds(service, token_file)
    finally:
        stop.set()
        service.close()
        client.close()


@pytest.fixture
def bucket(s3: Any) -> Callable[..., str]:
    """Make a bucket on moto holding ``objects`` (key -> bytes); returns its name."""
    import boto3

    admin = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                         aws_access_key_id="admin", aws_secret_access_key="admin")

    def make(objects: dict[str, bytes] | None = None) -> str:
        name = "b-" + uuid.uuid4().hex[:12]
        admin.create_bucket(Bucket=name)
        for key, data in (objects or {}).items():
            admin.put_object(Bucket=name, Key=key, Body=data)
        return name

    make.client = admin  # type: ignore[attr-defined]
    return make


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
