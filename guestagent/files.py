"""The one way this project writes files: atomically, with mode and owner set before the rename.

A reader (or a crash) sees either the old content or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
# (a wrong path, /dev/zero, a disk image) is refused, not read into memory whole.
INPUT_LIMIT = 16 * 1024 * 1024


def read_input(path: Path | str, limit: int = INPUT_LIMIT) -> bytes:
    """``path``'s bytes, or OSError(EFBIG) past ``limit`` (``-`` is standard input)."""
    import errno
    import sys

    if str(path) == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit // (1024 * 1024)} MiB: not an input file")
    return data
