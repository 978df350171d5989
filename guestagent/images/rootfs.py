"""A Debian root file system from ``debootstrap --variant=minbase``, built once per recipe.

The tree is cached under ``<cache>/rootfs/<key>``, where the key hashes everything that
goes into it (suite, mirror, package list, this module's recipe version): a changed
input builds a new tree, an unchanged one is reused. Downloaded packages are kept in
``<cache>/debs`` so a rebuild does not fetch them again. Concurrent builders of one key
wait on a lock; a half-built tree is never seen under its final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guestagent import process
from guestagent.files import atomic_write
from guestagent.images import tools

log = logging.getLogger(__name__)

# Bump when the build steps below change what a tree contains.
RECIPE_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# systemd as init; python3 + venv for the agent's own environment; what user-data's
# handlers drive (sudo/visudo, chrony); dbus so systemctl and logind behave as on a VM;
# fuse3 (fusermount3, which rclone mount needs) for the OSS mounts of the storage service;
# rsync and the ssh client that `guestagent migrate` sends the disks with.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "sudo",
    "chrony",
    "fuse3",
    "rsync",
    "openssh-client",
)
COMPLETE = ".guestagent-rootfs"


@dataclass(frozen=True)
class Recipe:
    suite: str = "bookworm"
    mirror: str = DEFAULT_MIRROR
    variant: str = "minbase"
    packages: tuple[str, ...] = BASE_PACKAGES
    extra: tuple[str, ...] = field(default_factory=tuple)

    def key(self) -> str:
        inputs = {"version": RECIPE_VERSION, **asdict(self)}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return f"{self.suite}-{digest[:16]}"


def cached(recipe: Recipe, cache: Path) -> Path | None:
    """The finished tree for ``recipe``, or None if it has not been built."""
    tree = cache / "rootfs" / recipe.key()
    return tree if (tree / COMPLETE).exists() else None


def ensure(recipe: Recipe, cache: Path, timeout: float = 1800.0) -> Path:
    """The tree for ``recipe``, built first when the cache does not have it."""
    found = cached(recipe, cache)
    if found is not None:
        return found
    tools.require("debootstrap")
    base = cache / "rootfs"
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f"{recipe.key()}.lock"):
        found = cached(recipe, cache)
        if found is not None:
            return found
        return _build(recipe, cache, timeout)


def _build(recipe: Recipe, cache: Path, timeout: float) -> Path:
    final = cache / "rootfs" / recipe.key()
    work = cache / "rootfs" / f".{recipe.key()}.building"
    remove_tree(work)
    remove_tree(final)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    argv = [
        "debootstrap",
        f"--variant={recipe.variant}",
        f"--include={','.join(recipe.packages + recipe.extra)}",
        f"--cache-dir={debs.resolve()}",
        recipe.suite,
        str(work),
        recipe.mirror,
    ]
    log.info("building %s root file system in %s", recipe.suite, work)
    result = process.run(argv, timeout=timeout)
    if not result.ok:
        tail = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
        remove_tree(work)
        why = "timed out" if result.timed_out else f"exited {result.returncode}"
        raise RuntimeError(f"debootstrap {why}: {tail[-1] if tail else 'no output'}")
    _settle(work)
    atomic_write(
        work / COMPLETE,
        json.dumps({"recipe": asdict(recipe), "key": recipe.key(),
                    "seconds": round(time.monotonic() - start, 1)}) + "\n",
    )
    os.rename(work, final)
    return final


def _settle(root: Path) -> None:
    """Leave the tree as a first boot expects it: no package cache, no machine identity."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # An empty machine-id makes systemd generate one at boot (systemd's first-boot rule).
    atomic_write(root / "etc/machine-id", b"", mode=0o444)
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    atomic_write(root / "etc/hostname", "localhost\n")


def remove_tree(path: Path) -> None:
    """Remove a tree that may hold read-only directories (a root file system does)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    result = process.run(["rm", "-rf", "--one-file-system", str(path)], timeout=600)
    if not result.ok and path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
