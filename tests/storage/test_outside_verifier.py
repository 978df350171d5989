"""What an outside verifier found by using storage as a new user would: destinations with a
file or directory in the way, `out/` meaning a directory, flags out of range, keys that
collide on download. Each: one clear line, and the tree and bucket unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from storage_helpers import boto, random_file
from test_storage_cli import Cli, write_config
from test_transfer_trees import bucket_state, one_line, snapshot

from guestagent.storage.errors import BadInput
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import Transfers


@pytest.fixture
def cli(creds: Any, s3: Any, tmp_path: Path) -> Cli:
    boto(s3.url).create_bucket(Bucket="bkt")
    return Cli(write_config(tmp_path / "agent.toml", creds, s3.url, tmp_path / "state",
                            multipart_threshold=6 * MiB, part_size=5 * MiB))


def put(s3: Any, *keys: str) -> None:
    admin = boto(s3.url)
    for key in keys:
        admin.put_object(Bucket="bkt", Key=key, Body=key.encode())


# -- a file or a directory in the way ------------------------------------------------------


def test_tree_download_with_a_file_where_a_directory_goes(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    put(s3, "in/a.txt", "in/sub/b.txt")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").write_bytes(b"a file, not a directory")
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert f"{dest / 'sub'} is a file, not a directory" in one_line(info.value)
    assert snapshot(dest) == {"sub": b"a file, not a directory"}  # not even a.txt landed


def test_tree_download_with_a_directory_where_a_file_goes(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    put(s3, "in/a.txt", "in/b.txt")
    dest = tmp_path / "dest"
    (dest / "b.txt").mkdir(parents=True)
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert "b.txt is a directory here" in one_line(info.value)
    assert snapshot(dest) == {} and not (dest / "a.txt").exists()


@pytest.mark.parametrize("where", ["root", "ancestor"])
def test_downloads_into_a_path_under_a_file(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any, where: str
) -> None:
    """`cp -r oss://... f` and `cp oss://.../k f/x` with `f` a file: named, no traceback."""
    put(s3, "in/a.txt")
    blocker = random_file(tmp_path / "work" / "f", 3)
    before = blocker.read_bytes()
    root = blocker if where == "root" else blocker / "deeper"
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), root)
    assert f"{blocker} is a file, not a directory" in one_line(info.value)
    with pytest.raises(BadInput) as info:
        transfers.download_file(OssUrl.parse("oss://bkt/in/a.txt"), blocker / "x" / "a.txt")
    assert f"{blocker} is a file, not a directory" in one_line(info.value)
    assert blocker.read_bytes() == before and sorted(blocker.parent.iterdir()) == [blocker]


def test_sync_refuses_a_blocked_tree_in_a_dry_run_too(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    from guestagent.storage import trees

    put(s3, "in/sub/b.txt")
    dest = tmp_path / "dest"
    random_file(dest / "sub", 5)
    before = snapshot(dest)
    with pytest.raises(BadInput, match="is a file, not a directory"):
        trees.download_tree(transfers, OssUrl.parse("oss://bkt/in/"), dest,
                            only_changed=True, dry_run=True)
    assert snapshot(dest) == before


# -- keys that would collide ---------------------------------------------------------------


def test_tree_key_with_an_empty_segment_is_refused(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    """'a//b' and 'a/b' would both be written to a/b (two writers, one file)."""
    put(s3, "in/a/b", "in/a//b")
    dest = tmp_path / "dest"
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert "empty path segment" in one_line(info.value) and "in/a//b" in str(info.value)
    assert not dest.exists()


# -- the command line ----------------------------------------------------------------------


def test_cp_to_a_trailing_slash_puts_the_object_in_that_directory(
    cli: Cli, tmp_path: Path, s3: Any
) -> None:
    put(s3, "in/with space+50%.txt")
    res = cli("storage", "cp", "oss://bkt/in/with space+50%.txt", f"{tmp_path}/new/")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "new" / "with space+50%.txt").read_bytes() == b"in/with space+50%.txt"
    # A file of that name in the way: named, left as it was.
    (tmp_path / "file").write_bytes(b"mine")
    res = cli("storage", "cp", "oss://bkt/in/with space+50%.txt", f"{tmp_path}/file/")
    assert res.returncode == 2 and "is a file, not a directory" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert (tmp_path / "file").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--part-size", "inf"], "not a size: 'inf'"),
        (["--part-size", "nan"], "not a size: 'nan'"),
        (["--part-size", "1M"], "--part-size: must be 5M..5G"),
        (["--part-size", "6G"], "--part-size: must be 5M..5G"),
        (["--concurrency", "0"], "--concurrency: must be 1..256"),
        (["--concurrency", "100000"], "--concurrency: must be 1..256"),
    ],
)
def test_transfer_flags_out_of_range(cli: Cli, tmp_path: Path, s3: Any, flags: list[str],
                                     needle: str) -> None:
    src = random_file(tmp_path / "f.bin", 10)
    res = cli("storage", "cp", *flags, str(src), "oss://bkt/x/")
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].count(needle) == 1
    assert bucket_state(s3.url) == {}
