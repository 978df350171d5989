"""Fixtures of the storage tests: clients on the moto server, buckets, transfer options."""

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
def bucket(s3: Any) -> str:
    """An empty bucket on the (reset) moto server."""
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
