"""A PackagePath tarball unpacked into a work directory, safely.

Every member is checked before one byte is extracted: no absolute names, no ``..``, no
name through a symlink of the archive, links only to places inside the work dir, no
device files or FIFOs, and limits on the total size and the number of members (a tar
bomb is refused while reading its headers, before its data is decompressed to disk).
Then the archive is extracted into a temporary directory beside the work dir (Python's
``data`` filter as a second line of defence) and its entries moved in: a failure half-way
(disk full) leaves the work dir as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from guestagent.storage.errors import BadInput, StorageError

if TYPE_CHECKING:
    import tarfile

log = logging.getLogger(__name__)

GiB = 1024 ** 3
NAME_MAX = 255
PATH_MAX = 4095


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 8 * GiB  # sum of the members' sizes
    max_members: int = 100_000


@dataclass(frozen=True)
class Unpacked:
    workdir: Path
    members: int
    bytes: int


DEFAULT_LIMITS = Limits()


def unpack(archive: Path, workdir: Path, limits: Limits = DEFAULT_LIMITS) -> Unpacked:
    """Check every member of ``archive``, then extract it into ``workdir`` (created)."""
    import tarfile  # lazily: the idle daemon unpacks nothing

    where = f"package {archive.name}"
    try:
        with tarfile.open(archive, "r:*") as tar:
            members, total = _check_members(tar, where, limits)
            _read_to_end(tar)
    except tarfile.TarError as exc:
        raise BadInput(f"{where}: not a tar or tar.gz archive ({_first_line(exc)}); "
                       "build it with tar -czf") from None
    except (EOFError, OSError, ValueError) as exc:  # zlib/lzma errors: ValueError-like
        raise BadInput(f"{where}: the archive is truncated or corrupt "
                       f"({_first_line(exc)})") from None
    workdir.mkdir(parents=True, exist_ok=True)
    _clashes(members, workdir, where)
    staging = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.unpack-", dir=workdir.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(staging, filter="data")
        _move_in(staging, workdir)
    except tarfile.FilterError as exc:  # e.g. a link that escapes through another link
        raise BadInput(f"{where}: member {exc.tarinfo.name!r} would point outside the work "
                       "dir once its links are followed; nothing was changed (store real "
                       "paths instead of links to links)") from None
    except OSError as exc:
        raise StorageError(f"{where}: cannot unpack into {workdir}: {exc.strerror or exc}; "
                           "nothing was changed (free some space and retry)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked %s into %s: %d members, %d bytes", archive, workdir, len(members), total)
    return Unpacked(workdir, len(members), total)


def _first_line(exc: BaseException) -> str:
    """tarfile lists each method it tried on a line of its own: the first says it."""
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(":") if lines else type(exc).__name__


def _read_to_end(tar: tarfile.TarFile) -> None:
    """Read what follows the end-of-archive blocks: a compressed stream checks its CRC and
    length only at its very end, so a cut-off .tar.gz is named here, not unpacked."""
    import zlib

    stream = tar.fileobj
    if stream is None:
        return
    try:
        while stream.read(1 << 20):
            pass
    except zlib.error as exc:
        raise EOFError(str(exc)) from None


def _check_members(
    tar: tarfile.TarFile, where: str, limits: Limits
) -> tuple[list[tarfile.TarInfo], int]:
    members: list[tarfile.TarInfo] = []
    links: set[PurePosixPath] = set()
    seen: set[PurePosixPath] = set()  # what a hard link may name: an earlier member
    total = 0
    for member in tar:  # headers only: data is skipped, and we stop at the first breach
        name = _member_path(member.name, where)
        if len(members) >= limits.max_members:
            raise BadInput(f"{where}: more than {limits.max_members} members; "
                           "refusing a possible tar bomb (raise the member limit if intended)")
        total += max(member.size, 0)
        if total > limits.max_bytes:
            raise BadInput(f"{where}: unpacks to more than {limits.max_bytes} bytes; "
                           "refusing a possible tar bomb (raise the size limit if intended)")
        through = next((p for p in name.parents if p in links), None)
        if through is not None:
            raise BadInput(f"{where}: member {member.name!r} goes through the symlink "
                           f"{str(through)!r}; store the real path instead")
        _check_kind(member, name, where)
        if member.islnk() and _member_path(member.linkname, where) not in seen:
            raise BadInput(f"{where}: hard link {member.name!r} -> {member.linkname!r} names "
                           "no earlier member; archive the file before its links")
        if member.issym():
            links.add(name)
        seen.add(name)
        members.append(member)
    return members, total


def _member_path(raw: str, where: str) -> PurePosixPath:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise BadInput(f"{where}: member {raw.encode('unicode_escape').decode()!r} "
                       "has a control character in its name")
    if raw.startswith("/"):
        raise BadInput(f"{where}: member {raw!r} has an absolute path; "
                       "archive paths relative to the package root")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadInput(f"{where}: member {raw!r} contains '..' and would land outside the "
                       "work dir; archive paths relative to the package root")
    _check_length(raw, parts, where)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_length(raw: str, parts: list[str], where: str) -> None:
    """Linux's limits (255 bytes a name, 4095 a path), named before extraction: past them
    the unpack would fail half-way with an OS error."""
    def size(text: str) -> int:
        return len(text.encode("utf-8", "surrogateescape"))

    if any(size(p) > NAME_MAX for p in parts) or size(raw) > PATH_MAX:
        raise BadInput(f"{where}: member {raw[:60]!r}... is too long (at most {NAME_MAX} "
                       f"bytes a name, {PATH_MAX} in all); shorten it")


def _check_kind(member: tarfile.TarInfo, name: PurePosixPath, where: str) -> None:
    if member.ischr() or member.isblk():
        raise BadInput(f"{where}: member {member.name!r} is a device file; "
                       "packages may hold only files, directories and links inside them")
    if member.isfifo() or not (member.isfile() or member.isdir() or member.issym()
                               or member.islnk()):
        raise BadInput(f"{where}: member {member.name!r} is a special file; "
                       "packages may hold only files, directories and links inside them")
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            raise BadInput(f"{where}: symlink {member.name!r} points to the absolute path "
                           f"{target!r}, outside the work dir; use a relative link inside it")
        if _escapes(name.parent, target):
            raise BadInput(f"{where}: symlink {member.name!r} -> {target!r} points outside "
                           "the work dir; use a link inside the package")
    elif member.islnk():
        target = member.linkname
        if target.startswith("/") or _escapes(PurePosixPath("."), target):
            raise BadInput(f"{where}: hard link {member.name!r} -> {target!r} points outside "
                           "the work dir; link only to members of the package")


def _escapes(base: PurePosixPath, target: str) -> bool:
    depth = len([p for p in base.parts if p != "."])
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return True
    return False


def _clashes(members: list[tarfile.TarInfo], workdir: Path, where: str) -> None:
    """A package entry may not write through a symlink of the work dir, nor replace a
    directory with a file (or a file with a directory) already there."""
    for member in members:
        name = _member_path(member.name, where)
        if str(name) == ".":
            continue
        for part in [*reversed(name.parents[:-1]), name]:
            if (workdir / part).is_symlink():
                raise BadInput(f"{where}: {workdir / part} is a symlink in the work dir; "
                               "the package would write through it (remove it first)")
            if part != name and (workdir / part).exists() and not (workdir / part).is_dir():
                raise BadInput(f"{where}: member {member.name!r} needs {workdir / part} to "
                               "be a directory; it is a file (remove it or rename the member)")
        target = workdir / name
        if target.is_dir() and not member.isdir():
            raise BadInput(f"{where}: member {member.name!r} would replace the directory "
                           f"{target}; remove it or rename the member")
        if member.isdir() and target.exists() and not target.is_dir():
            raise BadInput(f"{where}: directory member {member.name!r} would replace the "
                           f"file {target}; remove it or rename the member")


def _move_in(staging: Path, workdir: Path) -> None:
    """Merge ``staging`` into ``workdir`` (same file system: renames)."""
    for entry in sorted(staging.iterdir()):
        target = workdir / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir():
            _move_in(entry, target)
            with contextlib.suppress(OSError):
                shutil.copystat(entry, target)
            continue
        os.replace(entry, target)


__all__ = ["DEFAULT_LIMITS", "Limits", "Unpacked", "unpack"]
