"""Local destination directories of downloads, checked before anything is written.

A file where a download needs a directory (``cp oss://b/k out/x`` with ``out`` a file, a
tree whose ``sub/`` is a file here) or a directory where it needs a file would otherwise
fail half-way, after other files had landed, with an OS traceback. Each is named here in
one line, before the first directory is made or byte fetched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from guestagent.storage.errors import BadInput


def blocker(directory: Path) -> Path | None:
    """The existing path that keeps ``directory`` from being a directory (a file, a
    dangling link, a socket at it or at one of its ancestors), or None."""
    path = Path(os.path.abspath(directory))
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return None if os.path.isdir(candidate) else candidate
    return None


def check_dirs(directories: Iterable[Path], where: str) -> None:
    """Refuse, naming it, a directory that cannot be made because a file is in the way."""
    for directory in directories:
        found = blocker(directory)
        if found is not None:
            whole = found == Path(os.path.abspath(directory))
            under = "" if whole else f" (needed for {directory})"
            raise BadInput(f"{where}: {found} is a file, not a directory{under}; move it "
                           "or choose another destination")


def check_files(targets: Iterable[Path], where: str) -> None:
    """Refuse a download target that is an existing directory (it would fail after the
    bytes arrived). One ``scandir`` per directory, not a ``stat`` per file."""
    by_parent: dict[Path, list[Path]] = {}
    for target in targets:
        by_parent.setdefault(target.parent, []).append(target)
    for parent, wanted in by_parent.items():
        try:
            with os.scandir(parent) as entries:
                dirs = {e.name for e in entries if e.is_dir()}
        except OSError:  # not there yet: made empty later
            continue
        for target in wanted:
            if target.name in dirs:
                raise BadInput(f"{where}: {target} is a directory here; cannot write the "
                               "object there (move it or choose another destination)")


def make_dirs(directory: Path, where: str) -> None:
    """``mkdir -p`` naming what stood in the way or was refused, in one line."""
    check_dirs([directory], where)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"{where}: cannot create {directory}: {exc.strerror}") from None
