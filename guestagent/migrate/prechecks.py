"""Pre-checks of the server to migrate (the tree at ``root``); they contact nothing.

Each check yields a :class:`Finding` carrying the guide's log keyword and what to do. A
fatal finding stops the run before the cloud is asked for anything.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from guestagent.migrate import faq
from guestagent.migrate.userconfig import UserConfig, in_root

VIRTIO = ("virtio_blk", "virtio_net", "virtio_pci")
# Only the network driver may come late (from /lib/modules after the root is mounted).
LATE_OK = frozenset({"virtio_net"})
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
MIN_FREE = 64 * 1024 * 1024  # client_data and Logs beside the config


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    message: str
    keyword: str | None = None
    fatal: bool = True

    @property
    def advice(self) -> str:
        return faq.advice(self.keyword) if self.keyword and not self.ok else ""

    def lines(self) -> list[str]:
        if self.ok:
            return [f"ok    {self.name}: {self.message}"]
        level = "FAIL " if self.fatal else "WARN "
        head = f"{level} {self.name}: " + (f"{self.keyword}: " if self.keyword else "")
        return [head + self.message, f"      what to do: {self.advice}"]


def run_all(root: Path, config: UserConfig | None, workdir: Path) -> list[Finding]:
    return [check_root(), check_rsync(), check_virtio(root), check_selinux(root),
            check_grub(root), check_free_space(workdir)]


def check_root() -> Finding:
    if os.geteuid() == 0:
        return Finding("root", True, "running as root")
    return Finding("root", False, f"running as uid {os.geteuid()}, not root", "root")


def check_rsync() -> Finding:
    missing = [tool for tool in ("rsync", "ssh") if shutil.which(tool) is None]
    if not missing:
        return Finding("rsync", True, "rsync and ssh found")
    return Finding("rsync", False, f"{' and '.join(missing)} not found on PATH",
                   "check rsync failed")


def check_selinux(root: Path) -> Finding:
    mode = selinux_mode(root)
    if mode in (None, "disabled"):
        return Finding("selinux", True, "SELinux disabled" if mode else "no SELinux")
    return Finding("selinux", False, f"SELinux is {mode} (/etc/selinux/config)",
                   "check selinux failed")


def selinux_mode(root: Path) -> str | None:
    if root == Path("/"):
        try:
            if Path("/sys/fs/selinux/enforce").read_text().strip() == "1":
                return "enforcing"
        except OSError:
            pass
    try:
        text = (root / "etc/selinux/config").read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"^\s*SELINUX\s*=\s*(\w+)", text, re.MULTILINE)
    return found[-1].lower() if found else None


def check_grub(root: Path) -> Finding:
    version = grub_version(root)
    if version is None:
        return Finding("grub", False, "no GRUB found in /boot", "GRUB older than 1.9",
                       fatal=False)
    if version < (1, 9):
        return Finding("grub", False, f"GRUB {'.'.join(map(str, version))} (legacy) is "
                       "older than 1.9", "GRUB older than 1.9", fatal=False)
    return Finding("grub", True, "GRUB 2 (1.9 or newer)")


def grub_version(root: Path) -> tuple[int, ...] | None:
    """GRUB 2 leaves grub.cfg (or its modules); legacy GRUB (0.97) only menu.lst/grub.conf."""
    boot = root / "boot"
    if any((boot / d / "grub.cfg").is_file() for d in ("grub", "grub2")) or any(
            (root / d).is_dir() for d in ("usr/lib/grub/i386-pc", "usr/lib/grub/x86_64-efi")):
        return (2, 0)
    if any((boot / "grub" / f).is_file() for f in ("menu.lst", "grub.conf")):
        return (0, 97)
    return None


def check_free_space(workdir: Path) -> Finding:
    try:
        st = os.statvfs(workdir)
    except OSError as exc:
        return Finding("free space", False, f"{workdir}: {exc.strerror}", "free space")
    free = st.f_bavail * st.f_frsize
    if free >= MIN_FREE:
        return Finding("free space", True, f"{free // 2**20} MB free beside the config")
    return Finding("free space", False, f"only {free // 2**20} MB free in {workdir}, "
                   f"{MIN_FREE // 2**20} MB needed", "free space")


# -- virtio --------------------------------------------------------------------------------

def check_virtio(root: Path) -> Finding:
    kernels = kernel_versions(root)
    if not kernels:
        return Finding("virtio", False, "no kernel modules under /lib/modules",
                       "check virtio failed")
    missing: dict[str, list[str]] = {}
    for version in kernels:
        lack = missing_virtio(root, version)
        if not lack:
            return Finding("virtio", True, f"virtio drivers present for kernel {version}")
        missing[version] = lack
    detail = "; ".join(f"kernel {v}: {', '.join(m)}" for v, m in missing.items())
    return Finding("virtio", False, f"missing from the kernel and its initramfs: {detail}",
                   "check virtio failed")


def kernel_versions(root: Path) -> list[str]:
    """The running kernel when migrating /, else the tree's kernels (newest first)."""
    if root == Path("/"):
        return [os.uname().release]
    try:
        names = [p.name for p in (root / "lib/modules").iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(names, key=_version_key, reverse=True)


def _version_key(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def missing_virtio(root: Path, version: str) -> list[str]:
    moddir = root / "lib/modules" / version
    have = builtin_modules(moddir)
    if root == Path("/"):
        have |= {m for m in VIRTIO if Path("/sys/module", m).exists()}
    early = initramfs_modules(root, version)
    late = {m for m in LATE_OK if _module_file(moddir, m)}
    return [m for m in VIRTIO if m not in have | (early or set()) | late]


def builtin_modules(moddir: Path) -> set[str]:
    try:
        text = (moddir / "modules.builtin").read_text(errors="replace")
    except OSError:
        return set()
    return {_module_name(line) for line in text.split()} & set(VIRTIO)


def _module_file(moddir: Path, name: str) -> bool:
    try:
        return any(p.name in {name + s for s in MODULE_SUFFIXES} for p in moddir.rglob(name + ".*"))
    except OSError:
        return False


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return base


def initramfs_modules(root: Path, version: str) -> set[str] | None:
    """virtio modules inside the kernel's initramfs; None when there is none we can read."""
    for name in (f"initrd.img-{version}", f"initramfs-{version}.img", f"initrd-{version}"):
        path = root / "boot" / name
        if path.is_file():
            try:
                names = cpio_names(path.read_bytes())
            except (OSError, ValueError, EOFError, lzma.LZMAError):
                return None
            return {_module_name(n) for n in names} & set(VIRTIO)
    return None


def cpio_names(data: bytes) -> Iterator[str]:
    """Member names of an initramfs: newc cpio archives, maybe compressed, concatenated."""
    while data:
        data = data.lstrip(b"\0")
        if not data:
            return
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:6] == b"\xfd7zXZ\x00":
            data = lzma.decompress(data)
        elif data[:6] not in (b"070701", b"070702"):
            raise ValueError("unsupported initramfs compression")
        names, data = _newc(data)
        yield from names


def _newc(data: bytes) -> tuple[list[str], bytes]:
    names: list[str] = []
    pos = 0
    while pos + 110 <= len(data) and data[pos:pos + 6] in (b"070701", b"070702"):
        filesize = int(data[pos + 54:pos + 62], 16)
        namesize = int(data[pos + 94:pos + 102], 16)
        name = data[pos + 110:pos + 110 + namesize - 1].decode(errors="replace")
        pos = _align(pos + 110 + namesize)
        pos = _align(pos + filesize)
        if name == "TRAILER!!!":
            return names, data[pos:]
        names.append(name)
    raise ValueError("truncated cpio archive")


def _align(n: int) -> int:
    return (n + 3) & ~3


# -- space ---------------------------------------------------------------------------------

def used_space(path: Path, skip: Iterable[Path] = ()) -> int:
    """Bytes used under ``path`` on its file system (like ``du -x``), minus ``skip`` and the
    default excludes.

    A mount point (``/`` always is one) is measured by its file system — ``statvfs`` is
    instant where a walk of a whole root takes seconds to minutes, and a little high (it
    counts the file system's own metadata, which the target disk needs too) — less what the
    excluded directories on that file system hold. Any other tree is walked.
    """
    from guestagent.migrate.transfer import DEFAULT_EXCLUDES

    excluded = {os.path.realpath(p) for p in skip}
    excluded |= {os.path.realpath(in_root(path, e.rstrip("*"))) for e in DEFAULT_EXCLUDES}
    dev = os.lstat(path).st_dev
    if not os.path.ismount(path):
        return _walk_used(str(path), dev, excluded)
    st = os.statvfs(path)
    hidden = 0
    for top in sorted(excluded):
        try:
            if os.lstat(top).st_dev == dev and os.path.isdir(top):
                hidden += _walk_used(top, dev, set())
        except OSError:
            continue
    return max((st.f_blocks - st.f_bfree) * st.f_frsize - hidden, 0)


def _walk_used(top: str, dev: int, skipped: set[str]) -> int:
    total = 0
    seen: set[int] = set()
    stack = [top]
    lstat = os.lstat
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = lstat(entry.path)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    # Only a directory can be another file system or an excluded path.
                    if st.st_dev != dev or entry.path in skipped:
                        continue
                    stack.append(entry.path)
                elif st.st_nlink > 1:
                    if st.st_ino in seen:  # one device: the inode alone identifies it
                        continue
                    seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total
