"""Files around one instance: its work dir and package, its mapping dirs, its logs, and
the uploads when it ends. Every OSS access goes through the storage capability's facade
(``guestagent.storage.api.Storage``: fetch_package, upload_dir, upload_file, mount).

Host mode maps the job's local paths as they are (one VM per instance in BatchCompute;
here the instances of a task share them); Docker mode stages them under the job's
directory and bind-mounts them at the paths the job names.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from guestagent.storage.mountrefs import Claim, MountRefs, Record
from guestagent.tasks.errors import TaskError
from guestagent.tasks.model import MountEntry, Task
from guestagent.tasks.runner import Bind

log = logging.getLogger(__name__)

DOCKER_WORKDIR = "/batchcompute/workdir"


class MountHandle(Protocol):
    def release(self) -> None: ...


class Storage(Protocol):
    """The storage facade the launcher needs (issue 10's ``storage.api.Storage``)."""

    def fetch_package(self, url: str, workdir: Path, /) -> object: ...

    def upload_dir(self, local_dir: Path, url: str, /) -> object: ...

    def upload_file(self, local: Path, url: str, /) -> object: ...

    def mount(self, source_url: str, dest: Path, write: bool = False, /, *,
              user: str | None = None) -> MountHandle: ...

    def nas_plan(self, source_url: str, dest: Path, write: bool = False, *,
                 lock: bool | None = None) -> Any: ...

    def mount_nas(self, source_url: str, dest: Path, write: bool = False, *,
                  lock: bool | None = None) -> Any: ...


def default_storage(settings: Any = None) -> Storage:
    """The storage facade from the agent's settings: transfers signed with keys from the
    local credential server's socket, read-only mounts by rclone through its loopback TCP
    listener (when enabled). A clear error if this build has no storage capability."""
    try:
        from guestagent.storage.api import Storage as Facade
        from guestagent.storage.connect import client_for
        from guestagent.storage.transfer import Options, Transfers
    except ImportError:
        raise TaskError(
            "this job reads or writes OSS but the storage capability is not installed"
        ) from None
    if settings is None:
        from guestagent import config

        settings = config.load()
    from guestagent.storage.api import NasOptions

    nas_options = NasOptions.from_settings(settings)
    try:
        client = client_for(settings)
    except Exception as exc:  # StorageError: no endpoint configured, bad URL
        # NAS entries need no OSS: what reads or writes OSS fails with this line.
        facade: Storage = Facade(_NoOss(f"OSS is not reachable from this agent: {exc}"),
                                 nas_options=nas_options)
        return facade
    facade = Facade(Transfers(client, Options.from_settings(settings)),
                    **_mount_options(settings, client), nas_options=nas_options)
    return facade


class _NoOss:
    def __init__(self, why: str) -> None:
        self.why = why

    def download_file(self, src: object, local: Path) -> object:
        raise TaskError(self.why)

    def upload_file(self, local: Path, dest: object) -> object:
        raise TaskError(self.why)


def _mount_options(settings: Any, client: Any) -> dict[str, Any]:
    creds = settings.credentials
    if not creds.tcp_enabled:
        return {}  # InputMapping then says mounts are not configured
    from guestagent.storage.mounts import Options as MountOptions
    from guestagent.storage.mounts import RcloneRemote

    ep = client.endpoint
    prefix = f"/{creds.path_secret}" if creds.path_secret else ""
    remote = RcloneRemote(
        endpoint=f"{ep.scheme}://{ep.netloc}",
        credentials_url=f"http://{creds.tcp_host}:{creds.tcp_port}{prefix}/v1/credentials/aws",
        region=ep.region, path_style=ep.path_style, token_file=creds.token_path)
    run_dir = Path(settings.daemon.run_dir) / "storage"
    return {"remote": remote, "options": MountOptions(run_dir=run_dir)}


def needs_storage(task: Task) -> bool:
    package = task.package_path or ""
    return bool(package.startswith("oss://") or task.stdout_redirect_path
                or task.stderr_redirect_path or task.output_mapping or task.log_mapping
                or any(m.is_nas for m in task.mounts))


def nas_mounts(layout: Layout, task: Task, docker: bool) -> list[tuple[MountEntry, Path]]:
    """(entry, host dir) of each NAS ``Mounts`` entry: mounted at its destination on the
    host, or (Docker) under the instance's dir and bind-mounted at the destination."""
    entries = [m for m in task.mounts if m.is_nas]
    return [(m, layout.root / f"nas-{n}" if docker else Path(m.destination))
            for n, m in enumerate(entries)]


class NasMounts:
    """An instance's NAS mounts: planned (``plans``, for ``tasks show``), then made for
    its life and released at its end. A mount point two instances share (host mode) is
    counted host-wide in ``refs``: made by its first user, undone by its last. A failure
    is one line naming the step (or the conflicting users), with what was already mounted
    undone."""

    def __init__(self, layout: Layout, task: Task, storage: Storage | None,
                 docker: bool, *, refs: MountRefs, user: str) -> None:
        self.wanted = nas_mounts(layout, task, docker)
        self.storage = storage
        self.refs = refs
        self.docker = docker
        self.plans: list[dict[str, str]] = []
        self.claims: list[Claim] = []
        if self.wanted and storage is None:
            raise TaskError(f"{task.name}: NAS mounts need the storage capability")
        for entry, host in self.wanted:
            assert storage is not None
            plan = storage.nas_plan(entry.source, host, entry.write, lock=entry.lock)
            options = ",".join(plan.options)
            self.plans.append({"source": entry.source, "options": options,
                               "destination": entry.destination, "host": str(host)})
            self.claims.append(Claim(str(plan.where), entry.source, options, user))

    def mount(self) -> None:
        """Every conflict is refused before the first mount; then each is counted in
        (and made by the first user)."""
        try:
            for claim in self.claims:
                self.refs.check(claim, partial(_nas_mounted, claim.where))
            for (entry, _), claim in zip(self.wanted, self.claims, strict=True):
                self.refs.acquire(claim, partial(self._make, entry, claim.where),
                                  partial(_nas_mounted, claim.where))
        except Exception as exc:  # the storage layer's errors are one line each
            self.release()
            raise TaskError(f"Mounts: {exc}") from None
        except BaseException:
            self.release()
            raise

    def adopt(self) -> None:
        """A re-adopted instance that still runs counts in again (a record lost or made
        before counting existed); a mount gone meanwhile is made again if it can be."""
        for (entry, _), claim in zip(self.wanted, self.claims, strict=True):
            try:
                self.refs.acquire(claim, partial(self._make, entry, claim.where),
                                  partial(_nas_mounted, claim.where))
            except Exception as exc:  # it runs on; its mount is reported, not fatal
                log.warning("%s: NAS mount at %s not restored: %s", claim.user, claim.where,
                            exc)

    def _make(self, entry: MountEntry, where: str) -> str | None:
        assert self.storage is not None
        handle = self.storage.mount_nas(entry.source, Path(where), entry.write, lock=entry.lock)
        made = getattr(handle, "made", None)
        return str(made) if made else None

    def release(self) -> None:
        """Count this instance out of its mounts (also those a previous agent made for
        it); the last user's release unmounts. Docker's per-instance mount points are
        unmounted whatever the records say: the instance's dir may be removed next."""
        for claim in self.claims:
            try:
                self.refs.release(claim.where, claim.user, partial(unmount_record,
                                                                   self.refs.folder))
                if self.docker:
                    _unmount_nas_at(claim.where)
            except Exception as exc:  # one line; the instance's outcome stands
                log.warning("NAS mount at %s not released: %s", claim.where, exc)


def _nas_mounted(where: str) -> bool:
    from guestagent.storage import nas

    return nas.mounted(Path(where))


def _unmount_nas_at(where: str) -> None:
    from guestagent.storage import nas

    nas.unmount(Path(where))


def unmount_record(folder: Path, record: Record) -> None:
    """Undo a mount (NAS or OSS) whose last user left; ``folder`` holds its count."""
    from guestagent.storage.api import unmount_record as undo

    undo(folder.parent, record)


def log_names(job_id: str, task: str, index: int) -> tuple[str, str]:
    """The guide's object names of an instance's two logs."""
    return f"stdout.{job_id}.{task}.{index}", f"stderr.{job_id}.{task}.{index}"


@dataclass(frozen=True)
class Layout:
    """Where one instance's files are on the host."""

    root: Path  # <job dir>/<task>/<index>

    @property
    def workdir(self) -> Path:
        return self.root / "workdir"

    @property
    def stdout(self) -> Path:
        return self.root / "stdout"

    @property
    def stderr(self) -> Path:
        return self.root / "stderr"

    @property
    def private(self) -> Path:
        return self.root / "run"

    def output(self, n: int) -> Path:
        return self.root / f"output-{n}"


def task_inputs(job_dir: Path, task: Task, docker: bool) -> list[tuple[str, Path, str]]:
    """(oss url, host dir, path seen by the command) of each input mapping and each OSS
    ``Mounts`` entry: both read-only OSS mounts (a writable one is refused by the rules)."""
    out = []
    for n, (url, local) in enumerate(sorted(task.input_mapping.items())):
        host = job_dir / task.name / f"input-{n}" if docker else Path(local)
        out.append((url, host, local))
    for n, entry in enumerate(m for m in task.mounts if not m.is_nas):
        host = job_dir / task.name / f"mount-{n}" if docker else Path(entry.destination)
        out.append((entry.source, host, entry.destination))
    return out


def instance_outputs(layout: Layout, task: Task, docker: bool) -> list[tuple[Path, str, str]]:
    """(host dir, path seen by the command, oss url) of each output mapping."""
    out = []
    for n, (local, url) in enumerate(sorted(task.output_mapping.items())):
        host = layout.output(n) if docker else Path(local)
        out.append((host, local, url))
    return out


def prepare(layout: Layout, task: Task, storage: Storage | None, docker: bool) -> None:
    """A fresh work dir with the package unpacked in it, empty logs, output dirs."""
    if layout.root.exists():
        shutil.rmtree(layout.root)
    layout.workdir.mkdir(parents=True)
    layout.private.mkdir()
    layout.stdout.touch()
    layout.stderr.touch()
    for host, _, _ in instance_outputs(layout, task, docker):
        host.mkdir(parents=True, exist_ok=True)
    package = task.package_path
    if package is None:
        return
    if package.startswith("oss://"):
        if storage is None:
            raise TaskError(f"{task.name}: PackagePath {package} needs the storage capability")
        storage.fetch_package(package, layout.workdir)
    else:
        unpack_local(Path(package), layout.workdir)


def unpack_local(package: Path, workdir: Path) -> None:
    """A package on this machine (a job.cfg ``pack``): a directory or a tarball."""
    if package.is_dir():
        shutil.copytree(package, workdir, symlinks=True, dirs_exist_ok=True)
        return
    import tarfile  # lazily: the idle daemon unpacks nothing

    try:
        with tarfile.open(package) as tar:
            tar.extractall(workdir, filter="data")  # refuses members escaping workdir
    except (OSError, tarfile.TarError) as exc:
        raise TaskError(f"package {package}: cannot unpack: {exc}") from None


def binds(layout: Layout, task: Task, job_dir: Path) -> tuple[Bind, ...]:
    out = [Bind(str(layout.workdir), DOCKER_WORKDIR)]
    out += [Bind(str(host), entry.destination, not entry.write)
            for entry, host in nas_mounts(layout, task, True)]
    out += [Bind(str(host), target, True) for _, host, target in task_inputs(job_dir, task, True)]
    out += [Bind(str(host), target) for host, target, _ in instance_outputs(layout, task, True)]
    for local in task.log_mapping:
        parent = str(Path(local).parent)
        if not any(b.target == parent for b in out):
            out.append(Bind(str(layout.root / "logmap" / parent.strip("/")), parent))
    return tuple(out)


def log_mapping_source(layout: Layout, local: str, docker: bool) -> Path:
    if not docker:
        return Path(local)
    parent = Path(local).parent
    return layout.root / "logmap" / str(parent).strip("/") / Path(local).name


def upload_results(
    layout: Layout, task: Task, job_id: str, index: int, *, storage: Storage | None,
    docker: bool,
) -> list[str]:
    """Upload the instance's logs, outputs and log mappings; the problems, one line each."""
    problems: list[str] = []
    wanted = bool(task.stdout_redirect_path or task.stderr_redirect_path
                  or task.output_mapping or task.log_mapping)
    if not wanted:
        return problems
    if storage is None:
        return ["uploads need the storage capability, which is not installed"]
    for kind, path, url in _uploads(layout, task, job_id, index, docker):
        try:
            if kind == "dir":
                storage.upload_dir(path, url)
            elif path.exists():
                storage.upload_file(path, url)
        except Exception as exc:  # the storage layer's errors are one line each
            log.warning("upload of %s to %s failed: %s", path, url, exc)
            problems.append(f"upload {path.name} -> {url}: {exc}")
    return problems


def _uploads(
    layout: Layout, task: Task, job_id: str, index: int, docker: bool
) -> list[tuple[str, Path, str]]:
    """What an instance uploads, in order: ("file" or "dir", local path, OSS url)."""
    out_name, err_name = log_names(job_id, task.name, index)
    jobs: list[tuple[str, Path, str]] = []
    if task.stdout_redirect_path:
        jobs.append(("file", layout.stdout, task.stdout_redirect_path + out_name))
    if task.stderr_redirect_path:
        jobs.append(("file", layout.stderr, task.stderr_redirect_path + err_name))
    for host, _, url in instance_outputs(layout, task, docker):
        jobs.append(("dir", host, url))
    for local, url in task.log_mapping.items():
        jobs.append(("file", log_mapping_source(layout, local, docker), url))
    return jobs


class Inputs:
    """A task's input mappings, mounted read-only while any of its instances may run;
    counted in host-wide as ``user`` (``job.task``), so another task, process or the
    daemon sharing a directory keeps its mount when this task ends."""

    def __init__(self, job_dir: Path, task: Task, storage: Storage | None, docker: bool,
                 user: str) -> None:
        self.handles: list[MountHandle] = []
        mappings = task_inputs(job_dir, task, docker)
        if mappings and storage is None:
            raise TaskError(f"{task.name}: InputMapping needs the storage capability")
        try:
            for url, host, _ in mappings:
                host.mkdir(parents=True, exist_ok=True)
                assert storage is not None
                self.handles.append(storage.mount(url, host, False, user=user))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self.handles:
            handle = self.handles.pop()
            with contextlib.suppress(Exception):
                handle.release()
