"""Small parts of transfers: progress sinks, CRC64, key refresh, the local-cloud stand-ins."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from guestagent.storage import integrity
from guestagent.storage.keys import SocketKeys
from guestagent.storage.progress import BarProgress, JsonProgress


def test_bar_progress_draws_bytes_and_files() -> None:
    out = io.StringIO()
    bar = BarProgress(out)
    bar.expect(2048, 2)
    bar.advance(1024)
    bar.finished("a", 1024)
    bar.advance(1024)
    bar.finished("b", 1024)
    bar.close()
    text = out.getvalue()
    assert "2.00k" in text and "2/2 files" in text


def test_json_progress_lines() -> None:
    out = io.StringIO()
    now = [0.0]
    sink = JsonProgress(out, clock=lambda: now[0])
    sink.expect(300, 1)
    for t in (1.0, 1.1, 2.0):  # a line at 1.0; 1.1 is too soon; a line at 2.0
        now[0] = t
        sink.advance(100)
    sink.finished("f", 300)
    sink.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["progress", "progress", "done"]
    assert lines[-1]["bytes"] == lines[-1]["total_bytes"] == 300 and lines[-1]["files"] == 1


def test_crc64_is_osss_crc64_ecma(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        # The CRC-64/XZ check value, as OSS sends it (decimal).
        assert integrity.file_crc64(fd) == 0x995DC9BBDF1939FA
        assert integrity.check_crc64(fd, str(0x995DC9BBDF1939FA), "f") is None
        assert "CRC64 mismatch" in (integrity.check_crc64(fd, "12345", "f") or "")
        assert integrity.check_crc64(fd, None, "f") is None
    finally:
        os.close(fd)


def test_crc64_chains_over_chunks_with_or_without_crcmod() -> None:
    import importlib.util

    data = os.urandom(100_000)
    fast = integrity.crc64_function()
    assert fast is not None  # fastcrc is a dependency: the check never silently goes away
    whole = fast(data, 0)
    assert fast(data[70_000:], fast(data[:70_000], 0)) == whole
    if importlib.util.find_spec("crcmod") is not None:
        import crcmod  # type: ignore[import-untyped]

        slow = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF,
                               rev=True)
        assert slow(data) == whole


def test_composite_etag() -> None:
    import hashlib

    parts = [b"a" * 10, b"b" * 5]
    digests = [hashlib.md5(p).digest() for p in parts]
    want = hashlib.md5(b"".join(digests)).hexdigest() + "-2"
    assert integrity.composite(digests) == want
    assert integrity.parts_of(want) == 2 and not integrity.is_plain(want)
    assert integrity.is_plain(hashlib.md5(b"x").hexdigest())


def test_socket_keys_refetch_before_expiry(creds: Any) -> None:
    now = [1000.0]
    keys = SocketKeys(creds.service.settings.socket_path,
                      token=lambda: creds.token_file.read_text().strip(),
                      clock=lambda: now[0])
    first = keys.current()
    served = creds.service.rotator.snapshot.credentials
    assert first.access_key_id == served.access_key_id
    assert served.access_key_secret not in repr(keys) + repr(first)
    # Long before expiry the cached set is reused; past half its life it is fetched again.
    fetches = []
    real = keys._fetch

    def counting() -> None:
        fetches.append(1)
        real()

    keys._fetch = counting  # type: ignore[method-assign]
    keys.current()
    assert fetches == []
    now[0] = first.expiration - 1
    keys.current()
    assert fetches == [1]


def test_moto_stand_in_makes_its_buckets(tmp_path: Path) -> None:
    from guestagent.localcloud.oss import MotoOss
    from guestagent.storage.endpoint import from_url
    from guestagent.storage.keys import Keys, StaticKeys
    from guestagent.storage.s3 import S3Client

    oss = MotoOss(tmp_path, {"GUESTAGENT_LOCALCLOUD_BUCKETS": "one,two"})
    env = oss.start()
    try:
        assert env["GUESTAGENT_STORAGE_PATH_STYLE"] == "true"
        client = S3Client(from_url(env["GUESTAGENT_STORAGE_ENDPOINT"], path_style=True),
                          StaticKeys(Keys("x", "y")))
        client.head_bucket("one")
        client.head_bucket("two")
        client.close()
    finally:
        oss.stop()


def test_daemon_way_in_signs_with_the_rotators_set(creds: Any, s3: Any, tmp_path: Path) -> None:
    from storage_helpers import boto, random_file

    from guestagent.config import from_mapping
    from guestagent.storage.connect import transfers_for
    from guestagent.storage.keys import SourceKeys
    from guestagent.storage.ossurl import OssUrl

    boto(s3.url).create_bucket(Bucket="bkt")
    settings = from_mapping({"storage": {"endpoint": s3.url, "path_style": True,
                                         "state_dir": str(tmp_path / "state")}})
    source = creds.service.source
    with transfers_for(settings, SourceKeys(source)) as t:
        t.upload_file(random_file(tmp_path / "f", 100), OssUrl.parse("oss://bkt/f"))
    served = source.snapshot.credentials
    assert (served.access_key_id, served.security_token) in s3.signed_with()
