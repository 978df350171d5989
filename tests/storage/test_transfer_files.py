"""One file up and down against a real S3 server (moto): single PUT, multipart, ranges."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from storage_helpers import boto, random_file

from guestagent.storage.ossurl import OssUrl
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import Transfers


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_small_file_round_trip(transfers: Transfers, bkt: str, tmp_path: Path,
                               s3: Any) -> None:
    src = random_file(tmp_path / "in" / "hello.bin", 4096)
    out = transfers.upload_file(src, OssUrl.parse("oss://bkt/dir/"))
    assert out.url.key == "dir/hello.bin"
    got = boto(s3.url).get_object(Bucket="bkt", Key="dir/hello.bin")["Body"].read()
    assert got == src.read_bytes()
    dest = tmp_path / "out"
    dest.mkdir()
    transfers.download_file(OssUrl.parse("oss://bkt/dir/hello.bin"), dest)
    assert (dest / "hello.bin").read_bytes() == src.read_bytes()
    assert not (dest / "hello.bin.part").exists()


def test_multipart_upload_and_ranged_download(transfers: Transfers, bkt: str,
                                              tmp_path: Path, s3: Any) -> None:
    src = random_file(tmp_path / "big.bin", 17 * MiB + 123)
    transfers.upload_file(src, OssUrl.parse("oss://bkt/big.bin"))
    head = boto(s3.url).head_object(Bucket="bkt", Key="big.bin")
    assert head["ETag"].strip('"').endswith("-4")  # 5 MiB parts: a real multipart object
    dest = tmp_path / "copy.bin"
    transfers.download_file(OssUrl.parse("oss://bkt/big.bin"), dest)
    assert md5(dest) == md5(src)
    assert not list((tmp_path / "state").rglob("*.json"))  # nothing left to resume


def test_empty_file(transfers: Transfers, bkt: str, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    transfers.upload_file(src, OssUrl.parse("oss://bkt/empty"))
    dest = tmp_path / "empty.out"
    transfers.download_file(OssUrl.parse("oss://bkt/empty"), dest)
    assert dest.read_bytes() == b""


def test_foreign_multipart_object_downloads(transfers: Transfers, bkt: str,
                                            tmp_path: Path, s3: Any) -> None:
    # Uploaded by another tool (boto3, 5 MiB parts, no part-size metadata).
    from boto3.s3.transfer import TransferConfig

    src = random_file(tmp_path / "foreign.bin", 12 * MiB)
    boto(s3.url).upload_file(str(src), "bkt", "foreign.bin", Config=TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    dest = tmp_path / "foreign.out"
    transfers.download_file(OssUrl.parse("oss://bkt/foreign.bin"), dest)
    assert md5(dest) == md5(src)
