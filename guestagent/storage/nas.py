"""NAS (NFS) mounts: ``nas://`` entries as systemd ``.mount`` units or fstab lines.

Options are Alibaba's recommended ones (NFSv3:
``vers=3,nolock,proto=tcp,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport``;
NFSv4.0: ``vers=4,minorversion=0,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,
noresvport``), plus ``_netdev`` so systemd orders them after the network, ``ro`` without
``WriteSupport``, and ``nolock`` unless ``Lock`` is true (NFSv3; NFSv4 locks in-band).

A preflight checks, in order, that the name resolves, that TCP 2049 answers, and that the
export can be listed (``nfs-ls`` from libnfs, no kernel client needed); it says which step
failed. Making the mount needs the kernel's NFS client and ``mount.nfs``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from guestagent import process
from guestagent.files import atomic_write
from guestagent.storage.errors import StorageError
from guestagent.storage.mappings import MountEntry, NasSource

NFS_PORT = 2049
COMMON = ("rsize=1048576", "wsize=1048576", "hard", "timeo=600", "retrans=2", "noresvport")
VERSIONS = {"3": ("vers=3", "nolock", "proto=tcp"), "4.0": ("vers=4", "minorversion=0")}
UNIT_DIR = Path("/etc/systemd/system")


@dataclass(frozen=True)
class NasPlan:
    """What mounting one entry means, before anything is done."""

    source: NasSource
    where: PurePosixPath
    options: tuple[str, ...]
    automount: bool = False
    units: dict[str, str] = field(default_factory=dict)  # file name -> content

    @property
    def unit_name(self) -> str:
        return unit_name(self.where)

    @property
    def start_unit(self) -> str:
        """The unit to enable/start: the automount one when on demand."""
        return self.unit_name.replace(".mount", ".automount") if self.automount else \
            self.unit_name

    def mount_argv(self) -> list[str]:
        opts = [o for o in self.options if not o.startswith(("_netdev", "x-systemd."))]
        return ["mount", "-t", "nfs", "-o", ",".join(opts), self.source.export, str(self.where)]

    def fstab_line(self) -> str:
        opts = list(self.options)
        if self.automount:
            opts.append("x-systemd.automount")
        return f"{_fstab_escape(self.source.export)} {_fstab_escape(str(self.where))} nfs " \
               f"{','.join(opts)} 0 0"

    def describe(self) -> str:
        lines = [f"source:   {self.source}", f"where:    {self.where}",
                 f"options:  {','.join(self.options)}",
                 f"command:  {' '.join(self.mount_argv())}",
                 f"fstab:    {self.fstab_line()}"]
        for name, text in self.units.items():
            lines += ["", f"# {UNIT_DIR / name}", text.rstrip()]
        return "\n".join(lines) + "\n"


def options(version: str = "3", *, lock: bool = False, write: bool = True,
            port: int = NFS_PORT, mount_port: int | None = None) -> tuple[str, ...]:
    """The mount options; ``port``/``mount_port`` only when not the standard ones (a
    server on other ports, as the local cloud's ganesha)."""
    if version not in VERSIONS:
        raise StorageError(f"nas version: want 3 or 4.0, got {version!r}")
    opts = [o for o in VERSIONS[version] if not (o == "nolock" and lock)]
    if port != NFS_PORT:
        opts.append(f"port={port}")
    if mount_port is not None and version == "3":
        opts.append(f"mountport={mount_port}")
    opts += COMMON
    if not write:
        opts.append("ro")
    opts.append("_netdev")
    return tuple(opts)


def plan(entry: MountEntry, *, version: str = "3", lock: bool = False,
         automount: bool = False, port: int = NFS_PORT,
         mount_port: int | None = None) -> NasPlan:
    if not isinstance(entry.source, NasSource):
        raise StorageError(f"{entry.source}: not a NAS source")
    opts = options(version, lock=lock, write=entry.write, port=port, mount_port=mount_port)
    base = NasPlan(entry.source, entry.destination, opts, automount)
    units = {base.unit_name: _mount_unit(base)}
    if automount:
        units[base.start_unit] = _automount_unit(base)
    return NasPlan(entry.source, entry.destination, opts, automount, units)


def _unit_value(value: object) -> str:
    """A value as systemd reads it back: ``%`` starts a specifier (``%b`` is the boot id)."""
    return str(value).replace("%", "%%")


def _mount_unit(p: NasPlan) -> str:
    install = "" if p.automount else "\n[Install]\nWantedBy=remote-fs.target\n"
    source, where = _unit_value(p.source), _unit_value(p.where)
    return (
        "[Unit]\n"
        f"Description=NAS {source} at {where} (guestagent)\n"
        "Documentation=man:nfs(5)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n[Mount]\n"
        f"What={_unit_value(p.source.export)}\n"
        f"Where={where}\n"
        "Type=nfs\n"
        f"Options={','.join(p.options)}\n"
        "TimeoutSec=90\n"
        + install
    )


def _automount_unit(p: NasPlan) -> str:
    source, where = _unit_value(p.source), _unit_value(p.where)
    return (
        "[Unit]\n"
        f"Description=NAS {source} at {where} on first use (guestagent)\n"
        "Documentation=man:nfs(5)\n"
        "\n[Automount]\n"
        f"Where={where}\n"
        "TimeoutIdleSec=0\n"
        "\n[Install]\n"
        "WantedBy=remote-fs.target\n"
    )


def unit_name(where: PurePosixPath) -> str:
    """systemd's name for the mount unit of ``where`` (as ``systemd-escape -p``)."""
    path = str(where).strip("/")
    if not path:
        return "-.mount"
    out = []
    for i, ch in enumerate(path.encode()):
        c = chr(ch)
        if c == "/":
            out.append("-")
        elif (c.isascii() and c.isalnum()) or c in ":_" or (c == "." and i > 0):
            out.append(c)
        else:
            out.append(f"\\x{ch:02x}")
    return "".join(out) + ".mount"


def _fstab_escape(text: str) -> str:
    return text.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


# -- preflight -----------------------------------------------------------------------------

Resolver = Callable[..., list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str


def preflight(source: NasSource, *, port: int = NFS_PORT, timeout: float = 5.0,
              nfs_ls: str = "nfs-ls", mount_port: int | None = None,
              resolve: Resolver = socket.getaddrinfo) -> list[Step]:
    """Resolve, connect, list: stops at the first step that fails."""
    steps: list[Step] = []
    try:
        infos = resolve(source.host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        steps.append(Step("resolve", False, f"{source.host} does not resolve: {exc}"))
        return steps
    address = infos[0][4][0]
    steps.append(Step("resolve", True, f"{source.host} -> {address}"))
    try:
        with socket.create_connection((address, port), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        steps.append(Step("connect", False, f"TCP {address}:{port} unreachable: {why} "
                                            "(check the security group and the mount target)"))
        return steps
    steps.append(Step("connect", True, f"TCP {address}:{port} answers"))
    steps.append(_list_export(source, port, timeout, nfs_ls, mount_port))
    return steps


def _list_export(source: NasSource, port: int, timeout: float, nfs_ls: str,
                 mount_port: int | None) -> Step:
    if shutil.which(nfs_ls) is None:
        return Step("export", False, f"{nfs_ls} not found: install libnfs-utils")
    url = f"nfs://{source.host}{source.path}"
    query = []
    if port != NFS_PORT:
        query.append(f"nfsport={port}")
    if mount_port is not None:
        query.append(f"mountport={mount_port}")
    if query:
        url += "?" + "&".join(query)
    result = process.run([nfs_ls, url], timeout=timeout + 10)
    if not result.ok:
        text = (result.stderr or result.stdout).decode(errors="replace").strip()
        why = text.splitlines()[-1] if text else f"nfs-ls exited {result.returncode}"
        if result.timed_out:
            why = "no answer in time"
        return Step("export", False, f"cannot list {source.path} on {source.host}: {why} "
                                     "(check the export path and the permission group)")
    return Step("export", True, f"{source.path} listed ({len(result.text().splitlines())} "
                                "entries)")


def check_preflight(steps: list[Step], source: NasSource) -> None:
    failed = next((s for s in steps if not s.ok), None)
    if failed is not None:
        raise StorageError(f"NAS preflight for {source}: step '{failed.name}' failed: "
                           f"{failed.detail}")


# -- doing it ------------------------------------------------------------------------------

def kernel_has_nfs() -> bool:
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1] in ("nfs", "nfs4") for line in text.splitlines() if line.strip())


def install(p: NasPlan, *, unit_dir: Path = UNIT_DIR, start: bool = True) -> list[Path]:
    """Write the units, reload systemd, and start the mount (or its automount)."""
    if start and not kernel_has_nfs():
        with contextlib.suppress(process.ProcessError):
            process.run(["modprobe", "nfs"], timeout=30)
    if start and not kernel_has_nfs():
        raise StorageError("this kernel has no NFS client (no nfs in /proc/filesystems and "
                           "modprobe nfs failed); use 'storage nas plan' to see the units, "
                           "or run on a kernel with NFS support")
    if start and shutil.which("mount.nfs") is None:
        raise StorageError("mount.nfs not found: install nfs-common (Debian) or "
                           "nfs-utils (RHEL)")
    written = []
    for name, text in p.units.items():
        written.append(atomic_write(unit_dir / name, text, mode=0o644))
    if start:
        for argv in (["systemctl", "daemon-reload"],
                     ["systemctl", "enable", "--now", p.start_unit]):
            result = process.run(argv, timeout=120)
            if not result.ok:
                detail = result.stderr.decode(errors="replace").strip().splitlines()
                raise StorageError(f"{' '.join(argv)} failed: "
                                   f"{detail[-1] if detail else result.returncode}")
    return written


def mount(p: NasPlan) -> None:
    """Mount now, for a while (a task instance's life): no unit, undone by :func:`unmount`.
    Raises a one-line :class:`StorageError` saying why it cannot."""
    if not kernel_has_nfs():
        with contextlib.suppress(process.ProcessError):
            process.run(["modprobe", "nfs"], timeout=30)
    if not kernel_has_nfs():
        raise StorageError("this kernel has no NFS client (no nfs in /proc/filesystems and "
                           "modprobe nfs failed): run on a kernel with NFS support")
    if shutil.which("mount.nfs") is None:
        raise StorageError("mount.nfs not found: install nfs-common (Debian) or "
                           "nfs-utils (RHEL)")
    result = process.run(p.mount_argv(), timeout=120)
    if not result.ok:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        raise StorageError(f"mount failed: {detail[-1] if detail else result.returncode}")


def mounted(where: Path | PurePosixPath) -> bool:
    """Whether something is mounted exactly at ``where``."""
    target = str(where).rstrip("/") or "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    # Field 5 is the mount point, with spaces etc. octal-escaped.
    return any(_fstab_escape(target) == line.split()[4] for line in lines if line.strip())


def unmount(where: Path | PurePosixPath) -> None:
    """Undo :func:`mount` (lazily: a process still in it does not keep it)."""
    if mounted(where):
        result = process.run(["umount", "-l", str(where)], timeout=60)
        if not result.ok:
            raise StorageError(f"umount {where} failed: "
                               f"{result.stderr.decode(errors='replace').strip()}")


__all__ = ["NasPlan", "Step", "check_preflight", "install", "kernel_has_nfs", "mount",
           "mounted", "options", "plan", "preflight", "unit_name", "unmount"]
