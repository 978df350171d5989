"""The transfers the storage facade needs, done with boto3 against the test's S3 server.

A stand-in only for the transfers module (issue 10's other half) until it lands: the
facade (``guestagent.storage.api.Storage``), its rules and the S3 server are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3

from guestagent.storage.ossurl import OssUrl


class BotoTransfers:
    def __init__(self, endpoint: str) -> None:
        self.s3: Any = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                    aws_access_key_id="test", aws_secret_access_key="test")

    def download_file(self, url: OssUrl, local: Path) -> None:
        self.s3.download_file(url.bucket, url.key, str(local))

    def upload_file(self, local: Path, url: OssUrl) -> None:
        self.s3.upload_file(str(local), url.bucket, url.key)

    def upload_tree(self, local_dir: Path, url: OssUrl) -> list[str]:
        keys = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = url.key + path.relative_to(local_dir).as_posix()
            self.s3.upload_file(str(path), url.bucket, key)
            keys.append(key)
        return keys

    def download_tree(self, url: OssUrl, local_dir: Path) -> None:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=url.bucket,
                                                                   Prefix=url.key)
        for page in pages:
            for obj in page.get("Contents", []):
                target = local_dir / obj["Key"][len(url.key):]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(url.bucket, obj["Key"], str(target))
