"""An image tree to apply user-data into, made from this machine's files: its shell,
coreutils and account tools with their libraries (scripts run chrooted into the tree), and
the account files useradd and friends read. Shared by tests/userdata/conftest.py and
bench/userdata.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow", "login.defs", "sudoers",
                 "nsswitch.conf")


def tool_tree(base: Path, tools: Iterable[str]) -> Path:
    """``tools`` (those found here) with their libraries under ``base``, plus /dev/null,
    /dev/zero, /dev/urandom and a sticky /tmp."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "dev").mkdir()
    (base / "tmp").mkdir(mode=0o1777)
    os.chmod(base / "tmp", 0o1777)
    for name, minor in (("null", 3), ("zero", 5), ("urandom", 9)):
        os.mknod(base / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        os.chmod(base / "dev" / name, 0o666)
    for top in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{top}"):
            (base / top).symlink_to(os.readlink(f"/{top}"))
    for tool in tools:
        found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        if found is None:
            continue
        for path in (found, *_libs(found)):
            _place(path, base)
    return base


def account_files(etc: Path) -> None:
    """This machine's account files, useradd's defaults and /etc/skel copied into ``etc``."""
    (etc / "default").mkdir(parents=True, exist_ok=True)
    for name in ACCOUNT_FILES:
        shutil.copy2(f"/etc/{name}", etc / name)
    shutil.copy2("/etc/default/useradd", etc / "default" / "useradd")
    shutil.copytree("/etc/skel", etc / "skel", symlinks=True)


def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60).stdout
    return [w for line in out.splitlines() for w in line.split() if w.startswith("/")]


def _place(path: str, base: Path) -> None:
    """Make ``base + path`` resolve as ``path`` does on this machine: every link on the
    way recreated, the file itself copied."""
    current = path
    for _ in range(16):
        if not os.path.islink(current):
            break
        where = base / os.path.realpath(os.path.dirname(current)).lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        link = where / os.path.basename(current)
        if not os.path.lexists(link):
            link.symlink_to(os.readlink(current))
        current = os.path.join(os.path.dirname(current), os.readlink(current))
    real = os.path.realpath(path)
    dest = base / real.lstrip("/")
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)
