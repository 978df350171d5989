"""Helpers of the storage tests (importable by name; conftest.py holds the fixtures)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from guestagent.storage.keys import Keys

KEYS = Keys("AKIDTESTSTORAGE", "test-secret-value", "test-token-value")


def boto(url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="a", aws_secret_access_key="b",
        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
    )


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path
