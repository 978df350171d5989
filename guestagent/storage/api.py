"""The storage facade the task launcher (and the daemon's storage service) call.

    storage = Storage(transfers=..., mounts=MountTable(), remote=..., options=...)
    storage.fetch_package("oss://bucket/worker.tar.gz", Path("/batchcompute/workdir"))
    handle = storage.mount("oss://bucket/input/", Path("/home/admin/input"))
    ...
    storage.upload_dir(Path("/home/admin/out"), "oss://bucket/out/")
    handle.release()

Transfers (download, upload) are the transfers module's; this class adds the mapping
rules, the safe unpack and the supervised mounts, and takes URLs as text or
:class:`OssUrl`. Every refusal is a :class:`BadInput` raised before anything changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from guestagent.storage.errors import BadInput, StorageError
from guestagent.storage.mappings import local_dir, parse_package_path
from guestagent.storage.mounts import Mount, MountTable, Options, RcloneRemote
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.package import DEFAULT_LIMITS, Limits, Unpacked, unpack

log = logging.getLogger(__name__)


class Transfers(Protocol):
    """What the facade needs from the transfers module."""

    def download_file(self, url: OssUrl, local: Path) -> object: ...

    def upload_file(self, local: Path, url: OssUrl) -> object: ...

    def upload_tree(self, local_dir: Path, url: OssUrl) -> list[str]:
        """Upload every regular file under ``local_dir``; the keys written."""
        ...


@dataclass
class MountHandle:
    """A mount made for a caller; ``release()`` unmounts it (lazily) and ends rclone."""

    source: OssUrl
    dest: Path
    _table: MountTable

    def release(self) -> None:
        self._table.release(self.dest)

    def healthy(self) -> bool:
        return any(m.dest == self.dest and m.check() == "ok" for m in self._table.mounts())

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Storage:
    def __init__(
        self,
        transfers: Transfers | None = None,
        *,
        mounts: MountTable | None = None,
        remote: RcloneRemote | None = None,
        options: Options | None = None,
        package_limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.transfers = transfers
        self.mounts = mounts if mounts is not None else MountTable()
        self.remote = remote
        self.options = options
        self.package_limits = package_limits

    def _transfers(self) -> Transfers:
        if self.transfers is None:
            raise StorageError("OSS transfers are not configured in this agent")
        return self.transfers

    def fetch_package(self, url: str | OssUrl, workdir: Path) -> Unpacked:
        """Download a PackagePath tarball and unpack it into ``workdir``, safely."""
        package = parse_package_path(str(url))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        suffix = ".tar" if package.key.endswith(".tar") else ".tar.gz"
        fd, tmp = tempfile.mkstemp(prefix=".package-", suffix=suffix, dir=workdir.parent)
        os.close(fd)
        archive = Path(tmp)
        try:
            archive.unlink()  # the download creates it (through its own .part file)
            self._transfers().download_file(package, archive)
            return unpack(archive, workdir, self.package_limits)
        finally:
            with contextlib.suppress(FileNotFoundError):
                archive.unlink()

    def upload_dir(self, local: Path, url: str | OssUrl) -> list[str]:
        """Upload everything under ``local`` to the OSS directory ``url`` (OutputMapping)."""
        dest = _oss_dir(url, "upload_dir")
        source = Path(local_dir(str(local), "upload_dir"))
        if not source.is_dir():
            raise BadInput(f"upload_dir: {source} is not a directory")
        return self._transfers().upload_tree(source, dest)

    def upload_file(self, local: Path, url: str | OssUrl) -> OssUrl:
        """Upload one file; ``url`` may be a directory (the file keeps its name)."""
        dest = url if isinstance(url, OssUrl) else OssUrl.parse(url, "upload_file")
        source = Path(local)
        if not source.is_file():
            raise BadInput(f"upload_file: {source} is not a regular file")
        target = dest.join(source.name) if dest.is_dir else dest
        self._transfers().upload_file(source, target)
        return target

    def mount(self, source_url: str | OssUrl, dest: Path, write: bool = False) -> MountHandle:
        """A read-only, supervised mount of an OSS directory at ``dest``."""
        if write:
            raise BadInput(f"mount {source_url}: writable OSS mounts are not supported; "
                           "mount read-only and upload results with an OutputMapping")
        source = _oss_dir(source_url, "mount")
        path = Path(local_dir(str(dest), "mount"))
        if self.remote is None or self.options is None:
            raise StorageError("OSS mounts are not configured in this agent "
                               "(no credential endpoint for rclone)")
        self.mounts.add(Mount(source, path, self.remote, self.options, origin="task"))
        return MountHandle(source, path, self.mounts)

    def close(self) -> None:
        self.mounts.stop_all()


def _oss_dir(url: str | OssUrl, where: str) -> OssUrl:
    parsed = url if isinstance(url, OssUrl) else OssUrl.parse(url, where)
    if not parsed.is_dir:
        raise BadInput(f"{where}: {parsed} must be an OSS directory (end it with '/')")
    return parsed


__all__ = ["MountHandle", "Storage", "Transfers"]
