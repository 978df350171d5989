"""PackagePath tarballs: unpacked into the work dir, or refused with one line and the work
dir left exactly as it was."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from guestagent.storage.errors import BadInput
from guestagent.storage.package import Limits, unpack


def snapshot(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(root.parent.rglob("*")):
        rel = str(p.relative_to(root.parent))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz"):
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o755
    return info, data


def entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info, None


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    wd = tmp_path / "box" / "workdir"
    wd.mkdir(parents=True)
    (wd / "kept.txt").write_text("already here")
    return wd


def test_a_worker_package_unpacks_with_its_links(tmp_path, workdir):
    archive = make_tar(tmp_path / "worker.tar.gz", [
        entry("bin", tarfile.DIRTYPE),
        file("bin/main.py", b"print('hi')\n"),
        entry("main.py", tarfile.SYMTYPE, "bin/main.py"),
        entry("copy.py", tarfile.LNKTYPE, "bin/main.py"),
    ])
    result = unpack(archive, workdir)
    assert (workdir / "main.py").read_text() == "print('hi')\n"
    assert os.readlink(workdir / "main.py") == "bin/main.py"
    assert (workdir / "copy.py").read_text() == "print('hi')\n"
    assert (workdir / "kept.txt").read_text() == "already here"
    assert os.access(workdir / "bin" / "main.py", os.X_OK)
    assert result.members == 4
    # No staging directory is left beside the work dir.
    assert sorted(p.name for p in workdir.parent.iterdir()) == ["workdir"]


def test_a_plain_tar_unpacks_too(tmp_path, workdir):
    archive = make_tar(tmp_path / "w.tar", [file("./run.sh", b"#!/bin/sh\n")], mode="w")
    unpack(archive, workdir)
    assert (workdir / "run.sh").read_bytes() == b"#!/bin/sh\n"


GiB = 1024 ** 3

BAD = {
    "dotdot": ([file("../escape.txt")], "contains '..'"),
    "dotdot-deep": ([file("a/../../escape.txt")], "contains '..'"),
    "absolute": ([file("/etc/evil")], "has an absolute path"),
    "symlink-absolute": ([entry("etc", tarfile.SYMTYPE, "/etc")], "points to the absolute path"),
    "symlink-up": ([entry("a/up", tarfile.SYMTYPE, "../../x")], "points outside the work dir"),
    "through-symlink": ([entry("d", tarfile.SYMTYPE, "."), file("d/x")],
                        "goes through the symlink 'd'"),
    "hardlink-out": ([entry("h", tarfile.LNKTYPE, "../../etc/passwd")],
                     "hard link 'h' -> '../../etc/passwd' points outside"),
    "hardlink-abs": ([entry("h", tarfile.LNKTYPE, "/etc/passwd")], "points outside"),
    "chardev": ([entry("null", tarfile.CHRTYPE)], "is a device file"),
    "blockdev": ([entry("sda", tarfile.BLKTYPE)], "is a device file"),
    "fifo": ([entry("pipe", tarfile.FIFOTYPE)], "is a special file"),
    "control": ([file("a\x07b")], "control character"),
    # tarfile's own errors (KeyError, ENAMETOOLONG) were tracebacks after extraction began
    "hardlink-to-nothing": ([entry("h", tarfile.LNKTYPE, "nothere")], "names no earlier member"),
    "hardlink-before-file": ([entry("h", tarfile.LNKTYPE, "later"), file("later")],
                             "names no earlier member"),
    "name-too-long": ([file("x" * 256)], "is too long (at most 255 bytes a name"),
    "path-too-long": ([file("/".join(["d" * 200] * 21))], "4095 in all"),
    # Each link stays inside on its own; followed, z -> y/../.. -> the work dir's parent.
    "symlink-chain": ([entry("d1", tarfile.DIRTYPE), entry("d1/d2", tarfile.DIRTYPE),
                       entry("d1/d2/y", tarfile.SYMTYPE, "../.."),
                       entry("d1/d2/z", tarfile.SYMTYPE, "y/../..")],
                      "'d1/d2/z' would point outside the work dir"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_dangerous_packages_are_refused_before_anything_is_written(case, tmp_path, workdir):
    members, message = BAD[case]
    # A harmless member first: it must not be extracted either.
    archive = make_tar(tmp_path / "bad.tar.gz", [file("first.txt"), *members])
    before = snapshot(workdir)
    with pytest.raises(BadInput) as err:
        unpack(archive, workdir)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert snapshot(workdir) == before


def test_a_tar_bomb_is_refused_from_its_headers(tmp_path, workdir):
    # A header that claims 9 GiB: refused before any data is read or written.
    info = tarfile.TarInfo("huge.bin")
    info.size = 9 * GiB
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    before = snapshot(workdir)
    with pytest.raises(BadInput, match="possible tar bomb"):
        unpack(archive, workdir)
    assert snapshot(workdir) == before


def test_a_gzip_bomb_is_refused_by_the_size_limit(tmp_path, workdir):
    archive = make_tar(tmp_path / "z.tar.gz", [file(f"z{i}", b"\0" * (1 << 20)) for i in range(4)])
    assert archive.stat().st_size < 100_000
    before = snapshot(workdir)
    with pytest.raises(BadInput, match="unpacks to more than"):
        unpack(archive, workdir, Limits(max_bytes=3 << 20))
    assert snapshot(workdir) == before


def test_too_many_members_are_refused(tmp_path, workdir):
    archive = make_tar(tmp_path / "many.tar.gz", [file(f"f{i}") for i in range(20)])
    with pytest.raises(BadInput, match="more than 10 members"):
        unpack(archive, workdir, Limits(max_members=10))
    assert not (workdir / "f0").exists()


def test_not_an_archive(tmp_path, workdir):
    junk = tmp_path / "worker.tar.gz"
    junk.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(BadInput, match=r"not a tar or tar.gz archive"):
        unpack(junk, workdir)


def test_a_symlink_in_the_work_dir_is_not_written_through(tmp_path, workdir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (workdir / "lib").symlink_to(outside)
    archive = make_tar(tmp_path / "w.tar.gz", [file("lib/evil.so")])
    with pytest.raises(BadInput, match="is a symlink in the work dir"):
        unpack(archive, workdir)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_a_truncated_gzip_is_refused(cut, tmp_path, workdir):
    """Cut in its data or only its CRC/length trailer (the tar inside still complete):
    refused, as gzip -t would, before anything is written."""
    whole = make_tar(tmp_path / "w.tar.gz", [file("a.bin", os.urandom(50_000)), file("b")])
    data = whole.read_bytes()
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-6])
    before = snapshot(workdir)
    with pytest.raises(BadInput) as err:
        unpack(archive, workdir)
    assert "truncated or corrupt" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(workdir) == before


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08\x00junk", b"plain text\n" * 50],
                         ids=["empty", "gzip-junk", "text"])
def test_not_an_archive_is_one_line(content, tmp_path, workdir):
    """tarfile lists every method it tried, one per line: the message keeps one line."""
    junk = tmp_path / "worker.tar.gz"
    junk.write_bytes(content)
    before = snapshot(workdir)
    with pytest.raises(BadInput) as err:
        unpack(junk, workdir)
    assert "\n" not in str(err.value) and "worker.tar.gz" in str(err.value)
    assert snapshot(workdir) == before


def test_a_file_in_the_work_dir_where_the_package_needs_a_directory(tmp_path, workdir):
    archive = make_tar(tmp_path / "w.tar.gz", [file("a-first.txt"), file("kept.txt/inner")])
    before = snapshot(workdir)
    with pytest.raises(BadInput) as err:
        unpack(archive, workdir)
    assert "needs" in str(err.value) and "kept.txt to be a directory" in str(err.value)
    assert snapshot(workdir) == before  # a-first.txt was not moved in either
