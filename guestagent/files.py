"""The one way this project writes files: atomically, with mode and owner set before the rename.

A reader (or a crash) sees either the old content or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import stat
import sys
import tempfile
from pathlib import Path


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
    backup_suffix: str | None = None,
    make_parents: bool = True,
    durable: bool = True,
) -> Path:
    """Write ``data`` to ``path`` atomically.

    The temporary file is created in the same directory (so the rename is atomic), gets
    ``mode`` and ownership *before* any byte is written (so a secret is never briefly
    world-readable), is fsynced, then renamed over the target. With ``backup_suffix`` the
    previous content is kept beside it as ``path + backup_suffix``. ``durable=False`` skips
    the fsyncs (still atomic, not power-cut safe): for frequent progress notes whose loss
    costs nothing, where an fsync would also flush whatever else the disk is writing.
    """
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if backup_suffix and target.exists():
            shutil.copy2(target, str(target) + backup_suffix)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(target.parent)
    return target


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# Input files a user names (user-data, a job, user_config.json) are small; anything larger
# (a wrong path, a disk image) is refused, not read into memory whole.
INPUT_LIMIT = 16 * 1024 * 1024
# How long a named pipe (FIFO) may keep us waiting for its next bytes or its end. Nothing
# tells a reader whether a FIFO has a writer: without a bound, one with none (a leftover
# `mkfifo`, a mistyped path) would hang the command forever.
FIFO_WAIT = 10.0

_NOT_INPUT = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_input(path: Path | str, limit: int = INPUT_LIMIT) -> bytes:
    """``path``'s bytes (``-``: standard input), or an OSError whose ``strerror`` is one line
    saying why not: larger than ``limit`` (EFBIG), a directory, device or socket (EINVAL),
    or a named pipe that stayed silent for FIFO_WAIT seconds (ETIMEDOUT)."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        data = _read_named(os.fspath(path), limit)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit // (1024 * 1024)} MiB: not an input file")
    return data


def _read_named(path: str, limit: int) -> bytes:
    _refuse_kind(os.stat(path).st_mode)  # before open: opening a device can act (a tape)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, unbounded.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        _refuse_kind(mode)  # the path may have been swapped since the stat
        if not stat.S_ISFIFO(mode):
            os.set_blocking(fd, True)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read(limit + 1)
        return _read_pipe(fd, limit, None if _anonymous_pipe(fd) else FIFO_WAIT)
    finally:
        os.close(fd)


def _refuse_kind(mode: int) -> None:
    for test, kind in _NOT_INPUT:
        if test(mode):
            raise OSError(errno.EINVAL, f"{kind}, not a regular file: name the file to read")


def _anonymous_pipe(fd: int) -> bool:
    """True for a pipe without a name (``<(cmd)``'s /dev/fd/N, a shell pipe): its writer
    exists from the start and its end is an EOF, so it is waited for as stdin is."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    except OSError:
        return False


def _read_pipe(fd: int, limit: int, wait: float | None) -> bytes:
    """Read to EOF, waiting at most ``wait`` seconds (None: no bound) for each next chunk.

    A FIFO opened non-blocking with no writer reads as an immediate EOF, so each read
    waits for poll to say there is data or a writer came and went: Linux reports neither
    for a FIFO no writer has opened since we did (the timeout then fires)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        if not poller.poll(None if wait is None else int(wait * 1000)):
            what = "stopped sending" if chunks else "had no writer"
            raise OSError(errno.ETIMEDOUT, f"a named pipe that {what} for {wait:g} s: write "
                          "all of it from another process, or name a regular file")
        try:
            chunk = os.read(fd, min(65536, limit + 1 - size))
        except BlockingIOError:  # woken, then another reader took the bytes
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
