"""Fixtures of the task tests: the credential service (emulator-backed, loopback TCP
listener), buckets on moto, and the storage facade with real rclone mounts."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from s3transfers import BotoTransfers
from tasks_helpers import tcp_base

from guestagent.config import from_mapping
from guestagent.credentials.service import CredentialService
from guestagent.metadata.client import MetadataClient

ADMIN = {"region_name": "us-east-1", "aws_access_key_id": "admin",
         "aws_secret_access_key": "admin"}


@pytest.fixture
def credentials(emulator: Any, tmp_path: Path) -> Iterator[CredentialService]:
    settings = from_mapping({
        "metadata": {"url": emulator.url, "timeout": 1.0, "retries": 1},
        "credentials": {"socket_path": str(tmp_path / "run" / "credentials.sock"),
                        "tcp_enabled": True, "tcp_port": 0},
    })
    client = MetadataClient(settings.metadata)
    service = CredentialService(settings, client)
    stop = threading.Event()
    service.start(stop)
    try:
        wait_for(lambda: service.rotator.snapshot.state == "ok", timeout=30)
        yield service
    finally:
        stop.set()
        service.close()
        client.close()


@pytest.fixture
def bucket(s3: Any) -> Callable[..., str]:
    """A fresh bucket on moto holding ``objects`` (key -> bytes); returns its name."""
    import boto3

    admin = boto3.client("s3", endpoint_url=s3.url, **ADMIN)

    def make(objects: dict[str, bytes] | None = None) -> str:
        name = "t-" + uuid.uuid4().hex[:12]
        admin.create_bucket(Bucket=name)
        for key, data in (objects or {}).items():
            admin.put_object(Bucket=name, Key=key, Body=data)
        return name

    make.client = admin  # type: ignore[attr-defined]
    return make


@pytest.fixture
def storage(s3: Any, credentials: CredentialService, tmp_path: Path) -> Iterator[Any]:
    """The real storage facade: rclone mounts keyed by the credential server; transfers
    over boto3 until the transfers module lands."""
    from guestagent.storage.api import Storage
    from guestagent.storage.mounts import MountTable, Options, RcloneRemote

    # rclone gets a consumer of its own, as the agent's storage service would.
    minted = credentials.registry.mint("storage-mounts", credentials.rotator)
    remote = RcloneRemote(endpoint=s3.url,
                          credentials_url=tcp_base(credentials) + minted.path
                          + "/v1/credentials/aws",
                          region="us-east-1", path_style=True, token=minted.token)
    table = MountTable()
    facade = Storage(BotoTransfers(s3.url), mounts=table, remote=remote,
                     options=Options(run_dir=tmp_path / "run-storage", ready_timeout=60))
    try:
        yield facade
    finally:
        table.stop_all(grace=2)
