"""Resume state of one unit of work (one file's upload or download), kept in the state dir.

A record is a small JSON file written atomically; it names the transfer (bucket, key,
local path) and holds what the server or the ``.part`` file already has. Holding the
record's lock (``flock`` on a sibling ``.lock``) keeps two processes from resuming the same
unit at once. No credential is ever in a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from guestagent.files import atomic_write
from guestagent.storage.errors import StorageError

# Part records are persisted at most this often (the server's ListParts is the truth for
# uploads anyway; a download re-fetches at most this much after kill -9).
SAVE_INTERVAL = 0.5


class Record:
    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self._saved = 0.0

    def save(self, *, force: bool = True, durable: bool = True) -> None:
        """Write the record (atomically). ``durable=False`` skips the fsyncs: for progress
        that a power cut may lose (see :func:`boot_id`), not for what only the record knows
        (an upload id)."""
        now = time.monotonic()
        if not force and now - self._saved < SAVE_INTERVAL:
            return
        self._saved = now
        try:
            atomic_write(self.path, json.dumps(self.data, sort_keys=True), mode=0o600,
                         durable=durable)
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot save transfer state: {exc.strerror}; "
                "set [storage] state_dir to a writable directory"
            ) from None

    def remove(self) -> None:
        for path in (self.path, self.path.with_suffix(".lock")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@functools.cache
def boot_id() -> str:
    """This boot's id. Download progress is saved without fsync (one per save cost more
    than the transfer's own writes on a busy disk): kill -9 keeps the page cache, so such
    a record is exact within a boot; after a reboot (a power cut may have lost the bytes
    that a surviving record claims) a download record is not trusted and starts over."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, kind: str, *ident: str) -> Path:
        digest = hashlib.sha256("\0".join(ident).encode("utf-8", "surrogateescape")).hexdigest()
        return self.root / kind / f"{digest[:40]}.json"

    @contextlib.contextmanager
    def unit(self, kind: str, *ident: str) -> Iterator[Record]:
        """The locked record of one transfer (``kind`` is ``uploads`` or ``downloads``)."""
        path = self._path(kind, *ident)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(
                f"{path.parent}: cannot keep transfer state: {exc.strerror}; "
                "set [storage] state_dir to a writable directory"
            ) from None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(
                    f"another transfer of {ident[-1]} is running (state {path.name})"
                ) from None
            data: dict[str, Any] = {}
            with contextlib.suppress(FileNotFoundError, ValueError, UnicodeDecodeError):
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    data = loaded
            yield Record(path, data)
        finally:
            os.close(lock_fd)
