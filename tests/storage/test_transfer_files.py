"""One file up and down against a real S3 server (moto): single PUT, multipart, ranges."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
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


@pytest.mark.parametrize("recorded", ["right", "wrong"])
def test_foreign_multipart_object_is_checked_against_its_md5chksum(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any, recorded: str
) -> None:
    """rclone and ossutil record a multipart object's MD5 as ``md5chksum`` metadata (its
    ETag is no MD5): a download checks it, as rclone does, and a mismatch leaves nothing
    under the final name."""
    import base64

    from boto3.s3.transfer import TransferConfig

    from guestagent.storage.transfer import IntegrityError

    src = random_file(tmp_path / "foreign.bin", 12 * MiB)
    digest = hashlib.md5(src.read_bytes()).digest()
    if recorded == "wrong":
        digest = hashlib.md5(b"other bytes").digest()
    boto(s3.url).upload_file(
        str(src), "bkt", "foreign.bin",
        ExtraArgs={"Metadata": {"md5chksum": base64.b64encode(digest).decode()}},
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    dest = tmp_path / "foreign.out"
    if recorded == "right":
        transfers.download_file(OssUrl.parse("oss://bkt/foreign.bin"), dest)
        assert md5(dest) == md5(src)
        return
    with pytest.raises(IntegrityError, match=r"MD5 .* does not match"):
        transfers.download_file(OssUrl.parse("oss://bkt/foreign.bin"), dest)
    assert not dest.exists() and not dest.with_name("foreign.out.part").exists()


def test_ranges_cover_the_object_and_grow_to_the_cap() -> None:
    import itertools

    from guestagent.storage import ranges

    size = 1024 * MiB + 5
    spans = ranges.plan(size, 8 * MiB, 4)
    assert [s[1] for s in spans[:5]] == [8 * MiB] * 4 + [16 * MiB]
    assert max(s[1] for s in spans) == ranges.SPAN_MAX
    assert spans[0][0] == 0 and sum(s[1] for s in spans) == size
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(spans))


class _StopAfter:
    """A progress sink that interrupts a download once ``limit`` bytes arrived."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0

    def expect(self, nbytes: int, files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.seen += nbytes
        if self.seen >= self.limit:
            raise KeyboardInterrupt

    def finished(self, name: str, nbytes: int) -> None:
        pass


@pytest.mark.parametrize("after", ["kill", "reboot", "a damaged record"])
def test_an_interrupted_download_resumes_within_a_boot_only(
    client: Any, options: Any, bkt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, after: str,
) -> None:
    """Progress records are saved without fsync: trusted after kill -9 (same boot), not
    after a reboot, when a power cut may have lost bytes that the record claims; a record
    whose counts do not fit the object is not trusted either."""
    import json
    import logging

    from guestagent.storage import ranges

    src = random_file(tmp_path / "big.bin", 17 * MiB)
    dest = tmp_path / "copy.bin"
    with Transfers(client, options) as t:
        t.upload_file(src, OssUrl.parse("oss://bkt/big.bin"))
    with Transfers(client, options, _StopAfter(12 * MiB)) as t, pytest.raises(KeyboardInterrupt):
        t.download_file(OssUrl.parse("oss://bkt/big.bin"), dest)
    assert not dest.exists() and dest.with_name("copy.bin.part").exists()
    if after == "reboot":
        monkeypatch.setattr(ranges, "boot_id", lambda: "another-boot")
    elif after == "a damaged record":
        [record] = (tmp_path / "state" / "downloads").glob("*.json")
        data = json.loads(record.read_text())
        data["got"] = [-5 for _ in data["got"]]
        record.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO), Transfers(client, options) as t:
        t.download_file(OssUrl.parse("oss://bkt/big.bin"), dest)
    assert ("resuming download" in caplog.text) is (after == "kill")
    assert md5(dest) == md5(src)
    assert not dest.with_name("copy.bin.part").exists()
