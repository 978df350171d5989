"""Host-wide reference counts of shared mount points (OSS through rclone, NAS through NFS).

Several users may need one local directory mounted at once: the instances of one task
(``InstanceCount > 1``), two tasks naming the same entry, the daemon's ``[storage] mounts``
and a foreground ``tasks submit``, a ``storage mount`` from the CLI. The mount point is made
by the first of them and undone by the last, never under another one still using it, in
whichever process each of them runs.

One record per mount point, ``<folder>/<sha of the mount point>.json`` (written with
``atomic_write``): the source, the options and the users. It is written *before* the mount
is made and removed only *after* the last user's unmount, so a kill -9 at any point leaves
a record a later user reconciles:

- a user named by :func:`process_user` (``name@pid<pid>.<start ticks>``) lives as long as
  that process: it is dropped as soon as its process is gone;
- any other user (a task instance ``job.task.index``, a task ``job.task``, the daemon's
  ``settings``, the CLI's ``cli``) outlives its process on purpose — an agent restart
  leaves its mounts to the work still reading them — and is dropped by whoever can tell
  it ended (:meth:`MountRefs.prune`, e.g. the task scheduler with its store).

A per-mount-point ``flock`` (on a sibling ``.lock``) serialises the users of one mount
point across threads and processes; mounts of other points never wait for it, except for
the instant a first user checks that no mount point is inside another (``.nesting.lock``).

Refused, with one line naming both and before anything is mounted: a second user whose
source or options differ from the record's, a mount point where something this agent did
not record is mounted, and a mount point inside another one in use (or containing one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from guestagent.files import atomic_write
from guestagent.storage.errors import BadInput

log = logging.getLogger(__name__)

_PROCESS_USER = re.compile(r"@pid(\d+)\.(\d+)$")


class MountConflict(BadInput):
    """Two users want one mount point (or nested ones) in ways that cannot be shared."""


def proc_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] == "Z":
        return ""
    return fields[19]


def process_user(name: str, pid: int | None = None) -> str:
    """A user that lives as long as process ``pid`` (this one by default): its start time
    is part of the name, so a reused pid never passes for it."""
    pid = os.getpid() if pid is None else pid
    return f"{name}@pid{pid}.{proc_start(pid)}"


def process_gone(user: str) -> bool:
    """True for a :func:`process_user` whose process has ended."""
    match = _PROCESS_USER.search(user)
    return match is not None and proc_start(int(match[1])) != match[2]


@dataclass(frozen=True)
class Claim:
    """One user's wish for one mount: what decides whether two users may share it."""

    where: str  # the host mount point
    source: str
    options: str  # comma-separated mount options (read-only, locks, version, ports)
    user: str

    def describe(self) -> str:
        return f"{self.source} ({_access(self.options)})"


@dataclass
class Record:
    where: str
    source: str
    options: str
    users: list[str] = field(default_factory=list)
    made: str = ""  # the topmost directory made for the mount, removed after the last user

    def describe(self) -> str:
        return f"{self.source} ({_access(self.options)})"

    def to_json(self) -> str:
        return json.dumps({"where": self.where, "source": self.source, "options": self.options,
                           "users": self.users, "made": self.made})


def _mode(options: str) -> str:
    return "read-only" if "ro" in options.split(",") else "writable"


def _access(options: str) -> str:
    return f"{_mode(options)}: {options}" if options not in ("", "ro") else _mode(options)


def _users(record: Record) -> str:
    return ", ".join(record.users) or "an earlier user"


def conflict(record: Record, claim: Claim) -> str:
    """The one line refusing ``claim`` at a mount point ``record`` holds."""
    if record.source != claim.source:
        what = "another source"
    elif _mode(record.options) != _mode(claim.options):
        what = f"{_mode(record.options)} vs {_mode(claim.options)}"
    else:
        what = "other mount options"
    return (f"{claim.where} is in use by {_users(record)} with {record.describe()}; "
            f"{claim.user} wants {claim.describe()} there ({what}): give one of them another "
            "directory, or the same source and access")


def nested(record: Record, claim: Claim) -> str:
    """The one line refusing ``claim`` whose mount point is inside ``record``'s (or the
    reverse): one mount would hide or pin the other."""
    how = "inside" if _inside(claim.where, record.where) else "around"
    return (f"{claim.where} is {how} {record.where}, in use by {_users(record)} with "
            f"{record.describe()}; {claim.user} wants {claim.describe()} there: mount points "
            "may not be nested, choose directories side by side")


def _inside(inner: str, outer: str) -> bool:
    inner, outer = os.path.normpath(inner), os.path.normpath(outer)
    return inner != outer and inner.startswith(outer.rstrip("/") + "/")


class MountRefs:
    """The records under ``folder`` (one folder per host: ``<run_dir>/storage/refs``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, where: str) -> Path:
        digest = hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.folder / f"{digest}.json"

    @contextlib.contextmanager
    def _flock(self, path: Path) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # An empty lock file (never rewritten, so no atomic write); a fresh descriptor per
        # use, so threads of one process exclude each other as processes do.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, where: str) -> Iterator[Path]:
        path = self._path(where)
        with self._flock(path.with_suffix(".lock")):
            yield path

    @contextlib.contextmanager
    def holding(self, where: str) -> Iterator[Record | None]:
        """The record of ``where`` while no other user can change it (a remount must not
        race the last user's unmount)."""
        with self._locked(where) as path:
            yield self._load(path)

    def supervise(self, where: str) -> int | None:
        """Try to become the one supervisor of ``where``: a descriptor holding its
        ``.supervisor`` flock (close it to let go), or None when another holds it. The
        kernel drops the lock when its holder dies, so a killed supervisor is replaced by
        the next user that tries; never two at once."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path(where).with_suffix(".supervisor"), os.O_RDWR | os.O_CREAT,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def _load(self, path: Path) -> Record | None:
        try:
            doc = json.loads(path.read_text())
            return Record(str(doc["where"]), str(doc["source"]), str(doc["options"]),
                          [str(u) for u in doc["users"]], str(doc.get("made") or ""))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("mount record %s unreadable (%s): taken as absent", path, exc)
            return None

    def _save(self, path: Path, record: Record) -> None:
        atomic_write(path, record.to_json(), mode=0o600)

    def check(self, claim: Claim, mounted: Callable[[], bool]) -> None:
        """Refuse ``claim`` now if it cannot share what holds its mount point, or if its
        mount point is nested with another in use."""
        with self._locked(claim.where) as path:
            record = self._live(path, mounted)
            self._admissible(record, claim, mounted)
            if record is None:
                self._check_nesting(claim)

    def _live(self, path: Path, mounted: Callable[[], bool]) -> Record | None:
        """The record without the users whose process is gone; None for an empty
        leftover of a mount that is gone."""
        record = self._load(path)
        if record is None:
            return None
        gone = [u for u in record.users if process_gone(u)]
        if gone:
            record.users = [u for u in record.users if u not in gone]
            log.info("mount at %s: dropped %s (process gone)", record.where, ", ".join(gone))
            self._save(path, record)
        if not record.users and not mounted():
            path.unlink(missing_ok=True)
            return None
        return record

    @staticmethod
    def _admissible(record: Record | None, claim: Claim, mounted: Callable[[], bool]) -> None:
        if record is None:
            if mounted():
                raise MountConflict(f"{claim.where} already has a mount this agent did not "
                                    f"make; {claim.user} wants {claim.describe()} there: "
                                    "unmount it or choose another directory")
            return
        if (record.source, record.options) != (claim.source, claim.options):
            raise MountConflict(conflict(record, claim))

    def _check_nesting(self, claim: Claim) -> None:
        own = self._path(claim.where)
        for path in self._record_paths():
            if path == own:
                continue
            other = self._load(path)
            if other is None or not [u for u in other.users if not process_gone(u)]:
                continue
            if _inside(claim.where, other.where) or _inside(other.where, claim.where):
                raise MountConflict(nested(other, claim))

    def acquire(self, claim: Claim, mount: Callable[[], str | None],
                mounted: Callable[[], bool]) -> bool:
        """Count ``claim.user`` in; mount when no user has it mounted (the first, or the
        mount was lost). ``mount`` returns the directory it created, if any. True when
        this call made the mount."""
        with self._locked(claim.where) as path:
            record = self._live(path, mounted)
            self._admissible(record, claim, mounted)
            joined = record is None or claim.user not in record.users
            if record is None:
                record = Record(claim.where, claim.source, claim.options, [claim.user])
                # The nesting check and the first record are one step: two first users of
                # nested points cannot both pass.
                with self._flock(self.folder / ".nesting.lock"):
                    self._check_nesting(claim)
                    self._save(path, record)  # before the mount: a crash leaves a trace
            elif joined:
                record.users.append(claim.user)
                self._save(path, record)
            if mounted():
                return False
            return self._mount(path, record, claim.user if joined else None, mount)

    def _mount(self, path: Path, record: Record, joined: str | None,
               mount: Callable[[], str | None]) -> bool:
        try:
            made = mount()
        except BaseException:
            if joined is not None:
                record.users.remove(joined)
                self._store(path, record)
            raise
        if made:
            record.made = made
            self._save(path, record)
        return True

    def _store(self, path: Path, record: Record) -> None:
        if record.users:
            self._save(path, record)
        else:
            path.unlink(missing_ok=True)

    def adopt(self, claim: Claim) -> None:
        """Record a mount this agent made before it counted users (no user yet), unless
        a record exists."""
        with self._locked(claim.where) as path:
            if self._load(path) is None:
                self._save(path, Record(claim.where, claim.source, claim.options))

    def release(self, where: str, user: str,
                unmount: Callable[[Record], None]) -> bool | None:
        """Count ``user`` out; unmount when it was the last (users whose process is gone
        do not count). True if unmounted, False if others still use it, None if no
        record names this mount point."""
        with self._locked(where) as path:
            record = self._load(path)
            if record is None:
                return None
            record.users = [u for u in record.users if u != user and not process_gone(u)]
            self._save(path, record)  # no user left: an unmount that fails is tried again
            if record.users:
                return False
            unmount(record)
            path.unlink(missing_ok=True)
            return True

    def _record_paths(self) -> list[Path]:
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    def records(self) -> list[Record]:
        out = []
        for path in self._record_paths():
            record = self._load(path)
            if record is not None:
                out.append(record)
        return out

    def record(self, where: str) -> Record | None:
        return self._load(self._path(where))

    def users(self, where: str) -> list[str]:
        record = self.record(where)
        return list(record.users) if record is not None else []

    def prune(self, alive: Callable[[str], bool],
              unmount: Callable[[Record], None]) -> list[str]:
        """Drop every user ``alive`` says is gone (and every process user whose process
        is); unmount what no user is left for. The users dropped."""
        dropped: list[str] = []
        for seen in self.records():
            try:
                dropped += self._prune_one(seen.where, alive, unmount)
            except Exception as exc:  # one mount point's trouble must not stop the rest
                log.warning("mount at %s: stale users not released: %s", seen.where, exc)
        return dropped

    def _prune_one(self, where: str, alive: Callable[[str], bool],
                   unmount: Callable[[Record], None]) -> list[str]:
        with self._locked(where) as path:
            record = self._load(path)
            if record is None:
                return []
            gone = [u for u in record.users if process_gone(u) or not alive(u)]
            if not gone and record.users:
                return []
            record.users = [u for u in record.users if u not in gone]
            self._save(path, record)
            if not record.users:
                unmount(record)
                path.unlink(missing_ok=True)
            if gone:
                log.info("mount at %s: released for %s (no longer running)", where,
                         ", ".join(gone))
            return gone


__all__ = [
    "Claim",
    "MountConflict",
    "MountRefs",
    "Record",
    "proc_start",
    "process_gone",
    "process_user",
]
