"""Host-wide reference counts of the mounts task instances share.

In host mode a NAS ``Mounts`` entry is mounted at its ``Destination`` itself, so the
instances of one task (``InstanceCount > 1``), or two tasks naming the same entry, use one
mount point: it is made by the first of them and undone by the last, never under another
one still running. Docker mode mounts under each instance's own directory, so there every
mount has one user; it goes through the same records all the same.

One record per mount point, ``<folder>/<sha of the mount point>.json`` (written with
``atomic_write``): the source, the options and the users (``job.task.index``). It is
written *before* the mount is made and removed only *after* the last user's unmount, so a
kill -9 at any point leaves a record a later agent reconciles with the task store: a user
whose instance is no longer Running is dropped (:meth:`MountRefs.prune`), and an adopted
instance that still runs re-joins its mounts. A per-mount-point ``flock`` (on a sibling
``.lock``) serialises users of one mount point across threads and processes (the daemon
and a foreground ``tasks submit``); mounts of other points never wait for it.

A second user whose source or options differ from the record's is refused with one line
naming both, before anything is mounted; so is a mount point where something this agent
did not record is mounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from guestagent.files import atomic_write
from guestagent.tasks.errors import TaskError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """One user's wish for one mount: what decides whether two users may share it."""

    where: str  # the host mount point
    source: str
    options: str  # comma-separated mount options (read-only, locks, version, ports)
    user: str  # job.task.index

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
    return f"{_mode(options)}: {options}" if options else _mode(options)


def conflict(record: Record, claim: Claim) -> str:
    """The one line refusing ``claim`` at a mount point ``record`` holds."""
    if record.source != claim.source:
        what = "another source"
    elif _mode(record.options) != _mode(claim.options):
        what = f"{_mode(record.options)} vs {_mode(claim.options)}"
    else:
        what = "other mount options"
    users = ", ".join(record.users) or "an earlier instance"
    return (f"Mounts: {claim.where} is in use by {users} with {record.describe()}; "
            f"{claim.user} wants {claim.describe()} there ({what}): give one of them another "
            "Destination, or the same Source and WriteSupport")


class MountRefs:
    """The records under ``folder`` (``<state_dir>/tasks/mounts``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, where: str) -> Path:
        digest = hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.folder / f"{digest}.json"

    @contextlib.contextmanager
    def _locked(self, where: str) -> Iterator[Path]:
        path = self._path(where)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # An empty lock file (never rewritten, so no atomic write); a fresh descriptor per
        # use, so threads of one process exclude each other as processes do.
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)

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
        """Refuse ``claim`` now if it cannot share what holds its mount point."""
        with self._locked(claim.where) as path:
            self._admissible(self._live(path, mounted), claim, mounted)

    def _live(self, path: Path, mounted: Callable[[], bool]) -> Record | None:
        """The record, unless it is an empty leftover of a mount that is gone."""
        record = self._load(path)
        if record is not None and not record.users and not mounted():
            path.unlink(missing_ok=True)
            return None
        return record

    @staticmethod
    def _admissible(record: Record | None, claim: Claim, mounted: Callable[[], bool]) -> None:
        if record is None:
            if mounted():
                raise TaskError(f"Mounts: {claim.where} already has a mount this agent did "
                                f"not make; {claim.user} wants {claim.describe()} there: "
                                "unmount it or choose another Destination")
            return
        if (record.source, record.options) != (claim.source, claim.options):
            raise TaskError(conflict(record, claim))

    def acquire(self, claim: Claim, mount: Callable[[], str | None],
                mounted: Callable[[], bool]) -> bool:
        """Count ``claim.user`` in; mount when no user has it mounted (the first, or the
        mount was lost). ``mount`` returns the directory it created, if any. True when
        this call made the mount."""
        with self._locked(claim.where) as path:
            record = self._live(path, mounted)
            self._admissible(record, claim, mounted)
            if record is None:
                record = Record(claim.where, claim.source, claim.options)
            joined = claim.user not in record.users
            if joined:
                record.users.append(claim.user)
                self._save(path, record)  # before the mount: a crash leaves a trace
            if mounted():
                return False
            try:
                made = mount()
            except BaseException:
                if joined:
                    record.users.remove(claim.user)
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

    def release(self, where: str, user: str,
                unmount: Callable[[Record], None]) -> bool | None:
        """Count ``user`` out; unmount when it was the last. True if unmounted, False if
        others still use it, None if no record names this mount point."""
        with self._locked(where) as path:
            record = self._load(path)
            if record is None:
                return None
            if user in record.users:
                record.users.remove(user)
            if record.users:
                self._save(path, record)
                return False
            self._save(path, record)  # no user: an unmount that fails is tried again
            unmount(record)
            path.unlink(missing_ok=True)
            return True

    def records(self) -> list[Record]:
        out = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            record = self._load(path)
            if record is not None:
                out.append(record)
        return out

    def users(self, where: str) -> list[str]:
        record = self._load(self._path(where))
        return list(record.users) if record is not None else []

    def prune(self, alive: Callable[[str], bool],
              unmount: Callable[[Record], None]) -> list[str]:
        """Drop every user ``alive`` says is gone (its instance no longer runs); unmount
        what no user is left for. The users dropped."""
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
            gone = [u for u in record.users if not alive(u)]
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

