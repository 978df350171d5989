"""Fixtures of the task tests: the storage facade with real rclone mounts. The credential
server (``credentials``) and buckets (``bucket``) come from tests/fixtures/cloud.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.cloud import tcp_base
from s3transfers import BotoTransfers

from guestagent.credentials.service import CredentialService


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
