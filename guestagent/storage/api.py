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
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from guestagent.storage import nas
from guestagent.storage.errors import BadInput, StorageError
from guestagent.storage.keys import KeyProvider
from guestagent.storage.mappings import MountEntry, NasSource, local_dir, parse_package_path
from guestagent.storage.mountrefs import MountRefs, Record, process_user
from guestagent.storage.mounts import Mount, MountTable, Options, RcloneRemote
from guestagent.storage.nas import NasPlan
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.outputs import FlushReport, OutputSession
from guestagent.storage.package import DEFAULT_LIMITS, Limits, Unpacked, unpack

log = logging.getLogger(__name__)


class Transfers(Protocol):
    """What the facade needs from the transfers module (``transfer.Transfers``)."""

    def download_file(self, src: OssUrl, local: Path) -> object: ...

    def upload_file(self, local: Path, dest: OssUrl) -> object: ...


@dataclass(frozen=True)
class NasOptions:
    """How NAS entries are mounted: ``[storage] nas_*``."""

    version: str = "3"
    lock: bool = False
    port: int = 2049
    mount_port: int | None = None
    preflight_timeout: float = 5.0

    @classmethod
    def from_settings(cls, settings: Any) -> NasOptions:
        st = settings.storage
        return cls(version=st.nas_version, lock=st.nas_lock, port=st.nas_port,
                   mount_port=st.nas_mount_port or None)


@dataclass
class NasHandle:
    """A NAS mount made for a caller (a task instance); ``release()`` undoes it."""

    plan: NasPlan
    dest: Path
    made: Path | None = None  # the first directory created for it, removed at release

    def describe(self) -> dict[str, str]:
        return {"source": str(self.plan.source), "options": ",".join(self.plan.options),
                "destination": str(self.dest)}

    def release(self) -> None:
        nas.unmount(self.dest)
        remove_made(self.dest, self.made)


@dataclass
class MountHandle:
    """A mount made for a caller; ``release()`` unmounts it (lazily) and ends rclone."""

    source: OssUrl
    dest: Path
    _table: MountTable
    user: str = ""  # who it was counted in for (host-wide, see storage.mountrefs)

    def release(self) -> None:
        """Count this user out; the last user (in any process) unmounts."""
        self._table.release(self.dest, user=self.user or None)

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
        remote_factory: Callable[[], RcloneRemote] | None = None,
        nas_options: NasOptions | None = None,
    ) -> None:
        self.transfers = transfers
        self.nas_options = nas_options or NasOptions()
        self.mounts = mounts if mounts is not None else MountTable()
        self.remote = remote
        self._remote_factory = remote_factory
        self.options = options
        self.package_limits = package_limits
        self.sessions: list[OutputSession] = []
        self._lock = threading.Lock()
        self._watching: threading.Event | None = None

    @classmethod
    def from_settings(cls, settings: Any, keys: KeyProvider | None = None,
                      environ: Mapping[str, str] | None = None) -> Storage:
        """The agent's storage: transfers signed with ``keys`` (default: the credential
        server's socket, as the CLI does; the daemon passes its credential Source), mounts
        whose rclone reads keys from the credential server's loopback listener."""
        env = dict(os.environ if environ is None else environ)
        return cls(_LazyTransfers(settings, keys, env), options=mount_options(settings),
                   remote_factory=lambda: rclone_remote(settings, env),
                   nas_options=NasOptions.from_settings(settings))

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
        """Upload everything under ``local`` to the OSS directory ``url`` (OutputMapping);
        the keys written. Symlinks are not followed. Raises if any file failed."""
        session = self.open_output(local, url)
        try:
            report = session.finish()
        finally:
            self.close_output(session)
        if report.failed:
            rel, why = next(iter(report.failed.items()))
            raise StorageError(f"upload of {local} to {url}: {len(report.failed)} file(s) "
                               f"failed, first {rel}: {why}")
        return [session.dest.join(rel).key for rel in report.uploaded]

    def open_output(self, local: Path, url: str | OssUrl, *, streaming: bool = False,
                    kind: str = "output") -> OutputSession:
        """An OutputMapping (or LogMapping, ``kind="log"``) of a running task: pending files
        are flushed by :meth:`flush_all` on a drain; streaming ones upload each closed file."""
        if kind == "log":
            dest = url if isinstance(url, OssUrl) else OssUrl.parse(url, "LogMapping")
            source = Path(local_dir(str(local), "LogMapping"))
        else:
            dest = _oss_dir(url, "OutputMapping")
            source = Path(local_dir(str(local), "OutputMapping"))
            if source.exists() and not source.is_dir():
                raise BadInput(f"OutputMapping: {source} is not a directory")
        session = OutputSession(source, dest, self._transfers(), streaming=streaming, kind=kind)
        session.start()
        with self._lock:
            self.sessions.append(session)
        return session

    def close_output(self, session: OutputSession) -> None:
        session.stop_watching()
        with self._lock:
            if session in self.sessions:
                self.sessions.remove(session)

    def flush_all(self, deadline: float | None = None) -> dict[str, FlushReport]:
        """Upload what every open output/log session has pending (a spot drain)."""
        return {str(s.local): s.flush(deadline) for s in list(self.sessions)}

    def pending_uploads(self) -> int:
        return sum(len(s.pending()) for s in list(self.sessions))

    def upload_file(self, local: Path, url: str | OssUrl) -> OssUrl:
        """Upload one file; ``url`` may be a directory (the file keeps its name)."""
        dest = url if isinstance(url, OssUrl) else OssUrl.parse(url, "upload_file")
        source = Path(local)
        if not source.is_file():
            raise BadInput(f"upload_file: {source} is not a regular file")
        target = dest.join(source.name) if dest.is_dir else dest
        self._transfers().upload_file(source, target)
        return target

    @property
    def refs(self) -> MountRefs | None:
        """The host-wide counts of mount users (None when mounts are not configured)."""
        return self.options.refs if self.options is not None else None

    def mount(self, source_url: str | OssUrl, dest: Path, write: bool = False, *,
              origin: str = "task", user: str | None = None) -> MountHandle:
        """A read-only, supervised mount of an OSS directory at ``dest``, counted in for
        ``user`` (default: this process, for as long as it lives): joined if another user
        (in any process) has the same source mounted there, refused in one line if it has
        another source there, or a mount point inside or around ``dest``."""
        if write:
            raise BadInput(f"mount {source_url}: writable OSS mounts are not supported; "
                           "mount read-only and upload results with an OutputMapping")
        source = _oss_dir(source_url, "mount")
        path = Path(local_dir(str(dest), "mount"))
        remote = self.rclone_remote()
        if self.options is None:
            raise StorageError("OSS mounts are not configured in this agent")
        user = user or process_user(origin)
        self.mounts.add(Mount(source, path, remote, self.options, origin=origin), user)
        if origin == "task":
            self._watch()
        return MountHandle(source, path, self.mounts, user)

    def _watch(self) -> None:
        """Check (and, as their supervisor, heal) the task mounts from a thread of our own:
        the daemon's storage service checks only its own table."""
        with self._lock:
            if self._watching is not None or self.options is None:
                return
            self._watching = threading.Event()
            stop, interval = self._watching, self.options.check_interval
        threading.Thread(target=self.mounts.watch, args=(stop, interval), daemon=True,
                         name="storage-mount-watch").start()

    def leave(self) -> None:
        """An agent restart: mounts stay for their users, unsupervised by this process."""
        with self._lock:
            stop, self._watching = self._watching, None
        if stop is not None:
            stop.set()
        self.mounts.let_go_all()

    def nas_plan(self, source_url: str, dest: Path, write: bool = False, *,
                 lock: bool | None = None) -> NasPlan:
        """What mounting ``source_url`` at ``dest`` means (options, command), before
        anything is done; :class:`BadInput` for a bad source or destination."""
        source = NasSource.parse(str(source_url), "Mounts.Source")
        path = Path(local_dir(str(dest), "Mounts.Destination"))
        o = self.nas_options
        entry = MountEntry(source, PurePosixPath(path), write)
        return nas.plan(entry, version=o.version, lock=o.lock if lock is None else lock,
                        port=o.port, mount_port=o.mount_port)

    def mount_nas(self, source_url: str, dest: Path, write: bool = False, *,
                  lock: bool | None = None) -> NasHandle:
        """Preflight (name, TCP, export listed), then mount ``source_url`` at ``dest`` until
        ``release()``. A failure is one line naming the step; nothing is left behind."""
        plan = self.nas_plan(source_url, dest, write, lock=lock)
        o = self.nas_options
        steps = nas.preflight(plan.source, port=o.port, mount_port=o.mount_port,
                              timeout=o.preflight_timeout)
        nas.check_preflight(steps, plan.source)
        where = Path(str(plan.where))
        made = _make_dir(where)
        try:
            nas.mount(plan)
        except StorageError as exc:
            remove_made(where, made)
            raise StorageError(f"NAS mount of {plan.source} at {where}: step 'mount' failed: "
                               f"{exc}") from None
        return NasHandle(plan, where, made)

    def rclone_remote(self) -> RcloneRemote:
        if self.remote is None and self._remote_factory is not None:
            self.remote = self._remote_factory()
        if self.remote is None:
            raise StorageError("OSS mounts are not configured in this agent "
                               "(no credential endpoint for rclone)")
        return self.remote

    def close(self) -> None:
        if isinstance(self.transfers, _LazyTransfers):
            self.transfers.close()
        for session in list(self.sessions):
            self.close_output(session)
        with self._lock:
            stop, self._watching = self._watching, None
        if stop is not None:
            stop.set()
        self.mounts.stop_all()


class _LazyTransfers:
    """The transfers module's client, built on first use (an endpoint may need metadata)."""

    def __init__(self, settings: Any, keys: KeyProvider | None,
                 environ: Mapping[str, str]) -> None:
        self._args = (settings, keys, environ)
        self._inner: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._inner is None:
                from guestagent.storage import transfer
                from guestagent.storage.connect import client_for

                settings, keys, environ = self._args
                client = client_for(settings, keys, environ)
                self._inner = transfer.Transfers(client, transfer.Options.from_settings(settings))
            return self._inner

    def download_file(self, src: OssUrl, local: Path) -> object:
        return self._get().download_file(src, local)

    def upload_file(self, local: Path, dest: OssUrl) -> object:
        return self._get().upload_file(local, dest)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner.client.close()


def mount_options(settings: Any) -> Options:
    st = settings.storage
    return Options(run_dir=Path(settings.daemon.run_dir) / "storage",
                   ready_timeout=st.mount_ready_timeout, stat_timeout=st.mount_stat_timeout)


def rclone_remote(settings: Any, environ: Mapping[str, str]) -> RcloneRemote:
    """rclone's view of OSS: the [storage] endpoint, keys from the credential server's
    loopback TCP listener (rclone's AWS SDK reads an http URL, not a Unix socket)."""
    from guestagent.storage import endpoint, rclonebin

    cs = settings.credentials
    if not cs.tcp_enabled:
        raise StorageError("OSS mounts need the credential server's loopback listener "
                           "(rclone reads keys over HTTP): set [credentials] tcp_enabled = true")
    if not cs.tcp_port:  # the server's own choice, which rclone cannot be told
        raise StorageError("OSS mounts need a fixed [credentials] tcp_port (0 means any "
                           "free port, which rclone cannot be told); set one, e.g. 977")
    prefix = f"/{cs.path_secret}" if cs.path_secret else ""
    url = f"http://{cs.tcp_host}:{cs.tcp_port}{prefix}/v1/credentials/aws"
    ep = endpoint.resolve(settings.storage, environ,
                          lambda: endpoint.from_instance(settings.metadata))
    # The host endpoint's token file: rclone's SDK reads it itself, so the token is neither
    # in argv nor in its environment.
    return RcloneRemote(endpoint=f"{ep.scheme}://{ep.netloc}", credentials_url=url,
                        region=ep.region, path_style=ep.path_style, token_file=cs.token_path,
                        rclone=rclonebin.locate(settings.storage.rclone))


def unmount_record(run_dir: Path, record: Record) -> None:
    """Undo a mount whose last user left, whoever made it: a NAS mount is unmounted (and
    the directories made for it removed); an OSS one is unmounted and its rclone (found
    by its record under ``run_dir``, the mount options' run dir) ended."""
    where = Path(record.where)
    if not record.source.startswith("oss://"):
        nas.unmount(where)
        remove_made(where, Path(record.made) if record.made else None)
        return
    from guestagent.storage.mounts import read_record

    mount = Mount(OssUrl.parse(record.source), where, RcloneRemote("", ""),
                  Options(run_dir=run_dir))
    recorded = read_record(mount.record_path)
    if recorded is not None:
        mount.adopt(recorded)
    mount.stop()


def _make_dir(path: Path) -> Path | None:
    """Create ``path`` (and missing parents); the topmost directory created, if any."""
    top = None
    for parent in [*reversed(path.parents), path]:
        if not parent.exists():
            top = top or parent
    path.mkdir(parents=True, exist_ok=True)
    return top


def remove_made(path: Path, top: Path | None) -> None:
    """Remove the (empty) directories :func:`_make_dir` created, from ``path`` up to ``top``."""
    if top is None:
        return
    current = path
    while True:
        try:
            current.rmdir()
        except OSError:
            return
        if current in (top, current.parent):
            return
        current = current.parent


def _oss_dir(url: str | OssUrl, where: str) -> OssUrl:
    parsed = url if isinstance(url, OssUrl) else OssUrl.parse(url, where)
    if not parsed.is_dir:
        raise BadInput(f"{where}: {parsed} must be an OSS directory (end it with '/')")
    return parsed


__all__ = ["MountHandle", "NasHandle", "NasOptions", "Storage", "Transfers", "remove_made",
           "unmount_record"]
