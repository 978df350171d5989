"""Trees, sync and remove against moto; the bad-input corpus: one clear line, nothing
changed (local tree and bucket compared before and after)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import boto, random_file

from guestagent.storage import transfer, trees
from guestagent.storage.errors import AccessDenied, BadInput, NotFound, StorageError
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import Transfers


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def bucket_state(url: str, bucket: str = "bkt") -> dict[str, str]:
    listing = boto(url).list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listing}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def make_tree(root: Path) -> Path:
    random_file(root / "a.txt", 100)
    random_file(root / "sub" / "b.bin", 3000)
    random_file(root / "sub" / "deeper" / "c.bin", 7 * MiB)  # multipart at 6 MiB threshold
    (root / "empty.txt").write_bytes(b"")
    return root


def test_tree_round_trip_and_sync_copies_only_changes(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    src = make_tree(tmp_path / "src")
    dest = OssUrl.parse("oss://bkt/out/")
    keys = transfers.upload_tree(src, dest)
    assert sorted(keys) == ["out/a.txt", "out/empty.txt", "out/sub/b.bin",
                            "out/sub/deeper/c.bin"]
    down = tmp_path / "down"
    transfers.download_tree(dest, down)
    assert snapshot(down) == snapshot(src)

    # Nothing changed: sync copies nothing, either way.
    up = trees.upload_tree(transfers, src, dest, only_changed=True)
    assert up.copied == [] and len(up.skipped) == 4
    back = trees.download_tree(transfers, dest, down, only_changed=True)
    assert back.copied == [] and len(back.skipped) == 4

    # One file changed (same size), one added: exactly those go.
    (src / "sub" / "b.bin").write_bytes(os.urandom(3000))
    random_file(src / "new.txt", 10)
    up = trees.upload_tree(transfers, src, dest, only_changed=True)
    assert sorted(up.copied) == ["new.txt", "sub/b.bin"]
    back = trees.download_tree(transfers, dest, down, only_changed=True)
    assert sorted(back.copied) == ["new.txt", "sub/b.bin"]
    assert snapshot(down) == snapshot(src)


def test_sync_delete_and_dry_run(transfers: Transfers, bkt: str, tmp_path: Path,
                                 s3: Any) -> None:
    src = make_tree(tmp_path / "src")
    dest = OssUrl.parse("oss://bkt/out/")
    transfers.upload_tree(src, dest)
    (src / "a.txt").unlink()
    before = bucket_state(s3.url)
    plan = trees.upload_tree(transfers, src, dest, only_changed=True, delete=True,
                             dry_run=True)
    assert plan.deleted == ["out/a.txt"] and bucket_state(s3.url) == before
    trees.upload_tree(transfers, src, dest, only_changed=True, delete=True)
    assert "out/a.txt" not in bucket_state(s3.url)


def test_remove_one_recursive_and_dry_run(transfers: Transfers, bkt: str, tmp_path: Path,
                                          s3: Any) -> None:
    transfers.upload_tree(make_tree(tmp_path / "src"), OssUrl.parse("oss://bkt/out/"))
    before = bucket_state(s3.url)
    listed = trees.remove(transfers.client, OssUrl.parse("oss://bkt/out/"), recursive=True,
                          dry_run=True)
    assert sorted(listed) == sorted(before) and bucket_state(s3.url) == before
    trees.remove(transfers.client, OssUrl.parse("oss://bkt/out/a.txt"))
    assert "out/a.txt" not in bucket_state(s3.url)
    with pytest.raises(NotFound, match="no such object"):
        trees.remove(transfers.client, OssUrl.parse("oss://bkt/out/a.txt"))
    with pytest.raises(BadInput, match="use -r"):
        trees.remove(transfers.client, OssUrl.parse("oss://bkt/out/"))
    trees.remove(transfers.client, OssUrl.parse("oss://bkt/out/"), recursive=True)
    assert bucket_state(s3.url) == {}


# -- bad input: one line, nothing changed ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ("in/../../escape.txt", "'..' segment"),
        ("in/sub/../../../etc/evil", "'..' segment"),
        ("in//etc/passwd", "must not start with '/'"),
        ("in/ctl\x01name", "control character"),
        ("in/./dot", "'.' segment"),
    ],
)
def test_download_refuses_keys_that_escape_or_are_invalid(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any, key: str, needle: str
) -> None:
    admin = boto(s3.url)
    admin.put_object(Bucket="bkt", Key="in/good.txt", Body=b"fine")
    admin.put_object(Bucket="bkt", Key=key, Body=b"evil")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"mine")
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert needle in one_line(info.value)
    # Nothing was written: not even the good object, and nothing outside.
    assert snapshot(dest) == {"keep.txt": b"mine"}
    assert not (tmp_path / "escape.txt").exists()


def test_upload_refuses_symlink_out_of_tree(transfers: Transfers, bkt: str, tmp_path: Path,
                                           s3: Any) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    random_file(secret, 10)
    src = make_tree(tmp_path / "src")
    (src / "sub" / "link").symlink_to(secret)
    with pytest.raises(BadInput) as info:
        transfers.upload_tree(src, OssUrl.parse("oss://bkt/out/"))
    assert "points outside" in one_line(info.value) and "not followed" in str(info.value)
    assert bucket_state(s3.url) == {}


def test_upload_follows_symlink_inside_tree(transfers: Transfers, bkt: str, tmp_path: Path,
                                           s3: Any) -> None:
    src = tmp_path / "src"
    random_file(src / "real.txt", 10)
    (src / "alias.txt").symlink_to(src / "real.txt")
    (src / "dirlink").symlink_to(src)  # a loop if followed: it is not
    keys = transfers.upload_tree(src, OssUrl.parse("oss://bkt/out/"))
    assert sorted(keys) == ["out/alias.txt", "out/real.txt"]


def test_upload_refuses_dangling_symlink_and_control_chars(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    src = tmp_path / "src"
    random_file(src / "ok.txt", 10)
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BadInput, match="points nowhere"):
        transfers.upload_tree(src, OssUrl.parse("oss://bkt/out/"))
    (src / "dangling").unlink()
    random_file(src / "bad\x07name", 5)
    with pytest.raises(BadInput, match="control character"):
        transfers.upload_tree(src, OssUrl.parse("oss://bkt/out/"))
    assert bucket_state(s3.url) == {}


def test_upload_refuses_over_limit_keys(transfers: Transfers, bkt: str, tmp_path: Path,
                                       s3: Any) -> None:
    src = tmp_path / "src"
    deep = src
    for i in range(6):
        deep = deep / (f"{i}" * 200)
    random_file(deep / "file.txt", 10)  # 6 x 201 + 8 bytes of key: over 1023
    random_file(src / "ok.txt", 10)
    with pytest.raises(BadInput, match="at most 1023"):
        transfers.upload_tree(src, OssUrl.parse("oss://bkt/out/"))
    assert bucket_state(s3.url) == {}


def test_missing_bucket_is_named(transfers: Transfers, s3: Any, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        transfers.download_tree(OssUrl.parse("oss://no-such-bucket/x/"), tmp_path / "d")
    assert "no such bucket" in one_line(info.value)
    with pytest.raises(NotFound, match="no such bucket"):
        transfers.upload_file(random_file(tmp_path / "f", 5),
                              OssUrl.parse("oss://no-such-bucket/f"))
    assert not (tmp_path / "d").exists()


def test_download_of_missing_object(transfers: Transfers, bkt: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such object"):
        transfers.download_file(OssUrl.parse("oss://bkt/none"), tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs (needs root to mount)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("needs root and tmpfs to make a small file system")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_leaves_nothing_under_the_final_name(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any, small_fs: Path
) -> None:
    big = random_file(tmp_path / "big.bin", 6 * MiB)
    transfers.upload_file(big, OssUrl.parse("oss://bkt/big.bin"))
    with pytest.raises(StorageError) as info:
        transfers.download_file(OssUrl.parse("oss://bkt/big.bin"), small_fs / "big.bin")
    assert "free space" in one_line(info.value)
    assert list(small_fs.iterdir()) == []
    # The tree check adds sizes: two files that fit one by one but not together.
    for name in ("one", "two"):
        transfers.upload_file(random_file(tmp_path / name, 3 * MiB),
                              OssUrl.parse(f"oss://bkt/pair/{name}"))
    with pytest.raises(StorageError, match="free space"):
        transfers.download_tree(OssUrl.parse("oss://bkt/pair/"), small_fs / "pair")
    assert [p for p in small_fs.rglob("*") if p.is_file()] == []


def test_full_disk_before_the_first_byte(transfers: Transfers, bkt: str, tmp_path: Path,
                                         s3: Any, small_fs: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The space is there at the check and gone when the download reserves its size: it
    fails before any byte is fetched, and leaves nothing."""
    transfers.upload_file(random_file(tmp_path / "f.bin", 3 * MiB),
                          OssUrl.parse("oss://bkt/f.bin"))
    filler = small_fs / "filler"
    original = transfer._open_partial

    def fill_then_open(path: Path) -> int:
        filler.write_bytes(b"\0" * (3 * MiB))
        return original(path)

    fetched = transfers.client.requests
    monkeypatch.setattr(transfer, "_open_partial", fill_then_open)
    with pytest.raises(StorageError) as info:
        transfers.download_file(OssUrl.parse("oss://bkt/f.bin"), small_fs / "f.bin")
    assert "No space left" in one_line(info.value)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]
    assert transfers.client.requests == fetched + 1  # the HEAD; no GET


def test_full_disk_during_the_write(transfers: Transfers, bkt: str, tmp_path: Path,
                                    s3: Any, small_fs: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that cannot preallocate (NFSv3, FAT): the space goes while it writes."""
    transfers.upload_file(random_file(tmp_path / "f.bin", 3 * MiB),
                          OssUrl.parse("oss://bkt/f.bin"))
    monkeypatch.setattr(transfer, "_fallocate", lambda: lambda fd, size: errno.EOPNOTSUPP)
    # The space is there when the download starts and gone while it writes.
    filler = small_fs / "filler"
    original = transfers.client.get_range

    def fill_then_get(*args: Any, **kw: Any) -> Any:
        filler.write_bytes(b"\0" * (3 * MiB))
        return original(*args, **kw)

    transfers.client.get_range = fill_then_get  # type: ignore[method-assign]
    with pytest.raises(StorageError) as info:
        transfers.download_file(OssUrl.parse("oss://bkt/f.bin"), small_fs / "f.bin")
    assert "No space left" in one_line(info.value)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_wrong_credentials_named_403(tmp_path: Path, rclone_auth: Any) -> None:
    from guestagent.storage.keys import Keys, StaticKeys
    from guestagent.storage.s3 import S3Client
    from guestagent.storage.transfer import Options

    wrong = S3Client(rclone_auth.endpoint, StaticKeys(Keys(rclone_auth.key_id, "wrong")),
                     retries=1)
    with Transfers(wrong, Options(state_dir=tmp_path / "st")) as t:
        with pytest.raises(AccessDenied) as info:
            t.upload_file(random_file(tmp_path / "f", 10), OssUrl.parse("oss://bkt/f"))
        assert "403" in one_line(info.value) and "credentials were refused" in str(info.value)
        with pytest.raises(AccessDenied, match="403"):
            t.download_tree(OssUrl.parse("oss://bkt/"), tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert list((rclone_auth.data / "bkt").iterdir()) == []
