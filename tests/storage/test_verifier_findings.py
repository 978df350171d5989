"""Outside-verifier findings (wave five): tree downloads keep the original mtime, taken
from the GET's own headers; a zero-size file with content (/proc) is refused, not
uploaded empty; the task launcher refuses ``tcp_port = 0`` for mounts before any mount."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import boto, random_file

from guestagent.storage import trees
from guestagent.storage.errors import BadInput, StorageError
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.transfer import Transfers

OLD = 1_600_000_000.25  # a source mtime far from any upload time


def test_tree_download_keeps_our_mtime_and_sync_sees_no_change(
    transfers: Transfers, bkt: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    small = random_file(src / "sub" / "small.txt", 100)
    os.utime(small, (OLD, OLD))
    transfers.upload_tree(src, OssUrl.parse("oss://bkt/t/"))
    down = tmp_path / "down"
    trees.download_tree(transfers, OssUrl.parse("oss://bkt/t/"), down)
    got = down / "sub" / "small.txt"
    assert got.read_bytes() == small.read_bytes()
    assert abs(got.stat().st_mtime - OLD) < 0.001
    # The next sync, either way, finds nothing to copy.
    back = trees.download_tree(transfers, OssUrl.parse("oss://bkt/t/"), down, only_changed=True)
    assert back.copied == [] and back.skipped == ["sub/small.txt"]
    up = trees.upload_tree(transfers, down, OssUrl.parse("oss://bkt/t/"), only_changed=True)
    assert up.copied == [] and up.skipped == ["sub/small.txt"]


def test_tree_download_keeps_rclones_mtime_else_last_modified(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    s3c = boto(s3.url)
    # rclone records a file's mtime as x-amz-meta-mtime (seconds, decimal).
    s3c.put_object(Bucket="bkt", Key="r/by-rclone.txt", Body=b"rclone",
                   Metadata={"mtime": f"{OLD:.9f}"})
    s3c.put_object(Bucket="bkt", Key="r/plain.txt", Body=b"no metadata")
    plain = s3c.head_object(Bucket="bkt", Key="r/plain.txt")["LastModified"].timestamp()
    down = tmp_path / "down"
    copied = transfers.download_tree(OssUrl.parse("oss://bkt/r/"), down)
    assert sorted(copied) == ["r/by-rclone.txt", "r/plain.txt"]
    assert abs((down / "by-rclone.txt").stat().st_mtime - OLD) < 0.001
    assert (down / "plain.txt").stat().st_mtime == plain


def test_a_sizeless_file_with_content_is_refused_before_any_object(
    transfers: Transfers, bkt: str, s3: Any
) -> None:
    proc = Path("/proc/version")
    assert proc.stat().st_size == 0 and proc.read_bytes()  # what the case is about
    with pytest.raises(BadInput) as err:
        transfers.upload_file(proc, OssUrl.parse("oss://bkt/v"))
    text = str(err.value)
    assert "/proc/version" in text and "reports size 0 but has content" in text
    assert "\n" not in text
    assert boto(s3.url).list_objects_v2(Bucket="bkt")["KeyCount"] == 0


def test_an_empty_file_still_uploads_empty(transfers: Transfers, bkt: str, tmp_path: Path,
                                           s3: Any) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    transfers.upload_file(empty, OssUrl.parse("oss://bkt/e"))
    assert boto(s3.url).head_object(Bucket="bkt", Key="e")["ContentLength"] == 0


def test_task_mounts_refuse_tcp_port_0_before_mounting(tmp_path: Path, s3: Any) -> None:
    from guestagent import config
    from guestagent.tasks.staging import default_storage

    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[daemon]\nrun_dir = "{tmp_path / "run"}"\n'
                   f'[credentials]\nsocket_path = "{tmp_path / "none.sock"}"\n'
                   'tcp_enabled = true\ntcp_port = 0\n'
                   f'[storage]\nendpoint = "{s3.url}"\npath_style = true\n')
    storage = default_storage(config.load(cfg, environ={}))
    dest = tmp_path / "in"
    with pytest.raises(StorageError) as err:
        storage.mount("oss://bkt/in/", dest)
    assert "fixed [credentials] tcp_port" in str(err.value)
    assert not dest.exists() and not (tmp_path / "run" / "storage").exists()
