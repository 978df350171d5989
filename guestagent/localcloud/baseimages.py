"""Base images for the local Docker engine, built here (no registry on the internet).

- ``busybox``: the static busybox and its applet links (a few MB, built in a second);
- ``python``: Debian 12 ``debootstrap --variant=minbase`` plus ``python3-minimal``
  (about 150 MB: the "real" image of the task tests and the pull benchmark).

Root file systems are built once into a cache (``GUESTAGENT_IMAGE_CACHE``, default
``/var/cache/guestagent-test/images``) as tarballs, built under a temporary name and
renamed when complete, then ``docker import``-ed into whichever engine asks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from guestagent import process

CACHE = Path(os.environ.get("GUESTAGENT_IMAGE_CACHE", "/var/cache/guestagent-test/images"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"


class ImageBuildError(RuntimeError):
    """A base image could not be built; the message names the missing tool or the step."""


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists()
                                  else None)
    if path is None:
        raise ImageBuildError(f"{tool} not found: install Debian's {package}")
    return path


def busybox_tarball(cache: Path = CACHE) -> Path:
    """A root file system with busybox as /bin/sh and every applet."""
    target = cache / "busybox.tar"
    if target.exists():
        return target
    busybox = _require("busybox", "busybox-static")
    with _building(target) as root:
        for d in ("bin", "tmp", "etc", "root", "proc", "sys", "dev"):
            (root / d).mkdir(parents=True)
        (root / "tmp").chmod(0o1777)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = process.run([busybox, "--list"], timeout=10, check=True).text().split()
        for applet in applets:
            if applet != "busybox":
                with contextlib.suppress(FileExistsError):
                    (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
    return target


def python_tarball(cache: Path = CACHE, mirror: str | None = None) -> Path:
    """Debian 12 minbase with python3 (cached; a cold build takes a few minutes)."""
    target = cache / "debian-python.tar"
    if target.exists():
        return target
    debootstrap = _require("debootstrap", "debootstrap")
    with _building(target) as root:
        res = process.run(
            [debootstrap, "--variant=minbase", "--include=python3-minimal", SUITE,
             str(root), mirror or DEFAULT_MIRROR],
            timeout=1800,
        )
        if not res.ok:
            tail = res.stdout.decode(errors="replace").strip().splitlines()[-1:]
            raise ImageBuildError(f"debootstrap failed ({res.returncode}): {' '.join(tail)}")
        # Nothing of the build machine, and no package caches, in the image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / leftover, ignore_errors=True)
    return target


@contextmanager
def _building(target: Path) -> Iterator[Path]:
    """A root directory (not yet made) to build an image in, under a temporary directory
    beside ``target``; tarred into ``target`` (atomically) when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        yield root
        _tar(root, Path(tmp) / "out.tar")
        os.replace(Path(tmp) / "out.tar", target)


def _tar(root: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name)


def import_image(host: str, tarball: Path, name: str) -> str:
    """``docker import`` ``tarball`` as ``name`` into the engine at ``host``; its id."""
    docker = _require("docker", "docker.io")
    res = process.run([docker, "-H", host, "import", str(tarball), name], timeout=600)
    if not res.ok:
        raise ImageBuildError(
            f"docker import {name} failed: {res.stderr.decode(errors='replace').strip()}")
    return res.text().strip()
