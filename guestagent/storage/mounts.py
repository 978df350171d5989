"""Read-only OSS mounts with ``rclone mount``, supervised.

- rclone reads its keys from the agent's credential server (``env_auth`` with
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and a token in its environment): no key in argv or
  on disk, and a rotation is picked up by rclone itself.
- ``--read-only --allow-other``: the view is OSS's, and containers of other users see it.
- Supervised: a mount whose rclone process died, or whose directory answers "transport
  endpoint is not connected", is lazily unmounted and made again; health is a ``stat``
  with a timeout, so a hung FUSE server is reported, never waited on.
- Each mount is recorded in ``<run_dir>/storage/mounts/``, so ``storage mounts`` and a
  restarted daemon find (and adopt) mounts made by another process.
- rclone runs through :mod:`guestagent.detached` (a transient unit ``guestagent-mount-<hash
  of the mount point>`` under systemd), outside the agent's cgroup: an agent restart
  leaves the mount in place, and the next agent adopts it instead of remounting.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from guestagent import detached, process
from guestagent.files import atomic_write
from guestagent.storage import rclonebin
from guestagent.storage.errors import BadInput, StorageError
from guestagent.storage.mountrefs import Claim, MountRefs, proc_start, process_user
from guestagent.storage.ossurl import OssUrl

log = logging.getLogger(__name__)

REMOTE = "GAOSS"  # rclone remote configured through RCLONE_CONFIG_GAOSS_* variables
FUSE_CONF = Path("/etc/fuse.conf")
# The agent's own unit variables: meaningless (or misleading: rclone mount notifies
# NOTIFY_SOCKET) for a process that outlives it in another unit.
_AGENT_ONLY = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                         "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM",
                         "MAINPID", "MANAGERPID", "SYSTEMD_EXEC_PID"})
HUNG_CHECKS = 3  # consecutive timed-out health checks before a hung mount is remade


@dataclass(frozen=True)
class RcloneRemote:
    """How rclone reaches OSS (S3 API) and the credential server."""

    endpoint: str  # http(s)://host[:port] of the S3-compatible API
    # .../v1/credentials/aws on the local credential server (TCP); with a path_secret the
    # path is a capability: kept out of repr (and so out of any log of a mount).
    credentials_url: str = field(repr=False)
    region: str = ""
    path_style: bool = False
    token: str = field(default="", repr=False)  # AWS_CONTAINER_AUTHORIZATION_TOKEN
    token_file: Path | None = None
    rclone: str = field(default_factory=rclonebin.locate)

    def provider(self) -> str:
        # rclone's AWS provider insists on https; anything not OSS itself is "Other".
        host = urlsplit(self.endpoint).hostname or ""
        return "Alibaba" if host.endswith(".aliyuncs.com") else "Other"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment: ours minus any key material, plus the remote."""
        src = os.environ if base is None else base
        env = {k: v for k, v in src.items()
               if not k.startswith(("AWS_", "RCLONE_", "ALIBABA_CLOUD_", "OSS_"))}
        prefix = f"RCLONE_CONFIG_{REMOTE}_"
        env.update({
            prefix + "TYPE": "s3",
            prefix + "PROVIDER": self.provider(),
            prefix + "ENV_AUTH": "true",
            prefix + "ENDPOINT": self.endpoint,
            prefix + "FORCE_PATH_STYLE": "true" if self.path_style else "false",
            "RCLONE_CONFIG": "/notfound",  # keep rclone's config in memory only
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.credentials_url,
            # Never fall back to a shared file or an EC2 metadata address.
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        if self.region:
            env[prefix + "REGION"] = self.region
        if self.token:
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = self.token
        elif self.token_file is not None:
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(self.token_file)
        return env

    def path(self, url: OssUrl) -> str:
        return f"{REMOTE}:{url.bucket}/{url.key.rstrip('/')}".rstrip("/")


@dataclass(frozen=True)
class Options:
    """Where mounts keep their records and logs, and how they are checked."""

    run_dir: Path  # records: <run_dir>/mounts/*.json, logs: <run_dir>/logs/
    ready_timeout: float = 30.0
    stat_timeout: float = 2.0
    dir_cache_time: float = 30.0
    allow_other: bool = True
    check_interval: float = 2.0  # how often a task's mounts are checked (and healed)

    @property
    def refs(self) -> MountRefs:
        """The host-wide counts of who uses which mount point (beside the records)."""
        return MountRefs(self.run_dir / "refs")


# -- the kernel's view ---------------------------------------------------------------------

def mountinfo(path: Path) -> str | None:
    """The file system type mounted exactly at ``path`` (topmost), or None. Never blocks:
    it reads /proc, not the mount point."""
    target = os.path.abspath(path)
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = right.split()[0]
    return found


def _unescape(text: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def lazy_unmount(path: Path) -> bool:
    """Detach ``path`` now (it goes away once nothing uses it); True if something was."""
    if mountinfo(path) is None:
        return False
    for argv in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if shutil.which(argv[0]) is None:
            continue
        if process.run(argv, timeout=15).ok or mountinfo(path) is None:
            return True
    return mountinfo(path) is None


class _Probe:
    """``stat`` of a mount point in a thread with a timeout; one probe at a time, so a hung
    FUSE server costs one blocked thread, not one per check."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: str = ""

    def __call__(self, path: Path, timeout: float) -> str:
        if self._thread is not None and self._thread.is_alive():
            return "hung"
        done = threading.Event()

        def probe() -> None:
            try:
                os.stat(path)
                os.listdir(path)
                self._result = "ok"
            except OSError as exc:
                self._result = "disconnected" if exc.errno == errno.ENOTCONN else (
                    f"error: {exc.strerror or exc}")
            done.set()

        self._thread = threading.Thread(target=probe, name=f"stat {path}", daemon=True)
        self._thread.start()
        return self._result if done.wait(timeout) else "hung"


# -- processes: ours, or adopted from a record ---------------------------------------------

class _Proc(Protocol):
    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def stop(self, grace: float) -> None: ...


class _Detached:
    """rclone started through :mod:`guestagent.detached` (by us, or adopted by name)."""

    def __init__(self, work: detached.Detached, run_dir: Path) -> None:
        self.work = work
        self.run_dir = run_dir

    @property
    def pid(self) -> int:
        return self.work.pid or 0

    def alive(self) -> bool:
        return self.work.running()

    def stop(self, grace: float) -> None:
        self.work.stop(grace, run_dir=self.run_dir)  # also unlinks its record and env file
        process.reap_adopted()


class _Adopted:
    """A process recorded by another agent process: known by pid and start time (so a
    reused pid is never mistaken for it)."""

    def __init__(self, pid: int, started: str) -> None:
        self._pid = pid
        self.started = started

    @property
    def pid(self) -> int:
        return self._pid

    def alive(self) -> bool:
        return bool(self.started) and proc_start(self._pid) == self.started

    def stop(self, grace: float) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while self.alive() and time.monotonic() < end:
            time.sleep(0.05)
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, signal.SIGKILL)


# -- one mount -----------------------------------------------------------------------------

class Mount:
    """One read-only rclone mount of an OSS directory at a local directory."""

    def __init__(self, source: OssUrl, dest: Path, remote: RcloneRemote, options: Options,
                 *, origin: str = "cli") -> None:
        self.source = source
        self.dest = Path(dest)
        self.remote = remote
        self.options = options
        self.origin = origin  # who declared it: settings, task, cli
        self.proc: _Proc | None = None
        self.remounts = 0
        self.last_error = ""
        self.health = "new"
        self._probe = _Probe()
        self._hung = 0
        self._lock = threading.Lock()
        # This process's hold on the mount point's supervision (see :meth:`heal`).
        self._supervisor: int | None = None

    def __repr__(self) -> str:
        return f"Mount({self.source} -> {self.dest})"

    @property
    def record_path(self) -> Path:
        digest = hashlib.sha256(str(self.dest).encode()).hexdigest()[:16]
        return self.options.run_dir / "mounts" / f"{digest}.json"

    @property
    def refs(self) -> MountRefs:
        return self.options.refs

    def claim(self, user: str) -> Claim:
        return Claim(str(self.dest), str(self.source), "ro", user)

    @property
    def work_name(self) -> str:
        """The detached work's name (a valid unit name): stable for one mount point."""
        return f"mount-{self.record_path.stem}"

    @property
    def log_path(self) -> Path:
        return self.options.run_dir / "logs" / f"rclone-{self.record_path.stem}.log"

    def argv(self) -> list[str]:
        argv = [self.remote.rclone, "mount", self.remote.path(self.source), str(self.dest),
                "--read-only", "--vfs-cache-mode", "off", "--poll-interval", "0",
                "--dir-cache-time", f"{self.options.dir_cache_time:g}s",
                "--cache-dir", str(self.options.run_dir / "cache"),
                "--log-level", "NOTICE"]
        if self.options.allow_other:
            argv.append("--allow-other")
        return argv

    def preflight(self) -> None:
        """Refuse a mount that cannot work, before anything is changed."""
        if mountinfo(self.dest) is not None:
            if not self._stale_ours():
                raise BadInput(f"{self.dest}: something is already mounted there; "
                               "unmount it or choose another directory")
        elif self.dest.exists() and not self.dest.is_dir():
            raise BadInput(f"{self.dest}: exists and is not a directory")
        elif self.dest.is_dir() and any(self.dest.iterdir()):
            raise BadInput(f"{self.dest}: directory is not empty; a mount would hide its "
                           "files (choose an empty or new directory)")
        if not Path("/dev/fuse").exists():
            raise StorageError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
        rclonebin.require(self.remote.rclone)  # found, and new enough (asked once)
        if self.options.allow_other and os.geteuid() != 0 and not _user_allow_other():
            raise StorageError(f"{FUSE_CONF}: add 'user_allow_other' so --allow-other works")

    def _stale_ours(self) -> bool:
        """A mount this agent recorded at ``dest`` (dead or alive: ours to replace)."""
        record = read_record(self.record_path)
        return record is not None and record.get("dest") == str(self.dest)

    def check_source(self) -> None:
        """List the source once: a missing bucket or refused key is named now, not later."""
        result = process.run([self.remote.rclone, "lsf", "--max-depth", "1",
                              self.remote.path(self.source)],
                             env=self.remote.env(), timeout=self.options.ready_timeout)
        if not result.ok:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"rclone exited {result.returncode}"
            if result.timed_out:
                why = f"no answer in {self.options.ready_timeout:g}s ({_short(why)})"
            raise StorageError(f"{self.source}: cannot list it for the mount: {_short(why)}")

    def start(self) -> None:
        with self._lock:
            self.preflight()
            self.check_source()
            self.dest.mkdir(parents=True, exist_ok=True)
            self._spawn()

    def _spawn(self) -> None:
        lazy_unmount(self.dest)  # a dead FUSE mount of ours left behind
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        run_dir = self.options.run_dir
        old = detached.adopt(self.work_name, run_dir=run_dir)
        if old is not None:  # an rclone of ours whose record was lost: ours to replace
            old.stop(2.0, run_dir=run_dir)
        env = {k: v for k, v in self.remote.env().items() if k not in _AGENT_ONLY}
        work = detached.start(self.work_name, self.argv(), run_dir=run_dir, env=env,
                              log_path=self.log_path)
        self.proc = _Detached(work, run_dir)
        end = time.monotonic() + self.options.ready_timeout
        while mountinfo(self.dest) is None:
            if not self.proc.alive() or time.monotonic() > end:
                self.proc.stop(2.0)
                why = _last_line(self.log_path) or "it did not come up in time"
                self.health = "down"
                self.last_error = why
                raise StorageError(f"mount {self.source} at {self.dest} failed: {_short(why)}")
            time.sleep(0.05)
        self.health = "ok"
        self.last_error = ""
        self._write_record()
        log.info("mounted %s at %s (pid %s)", self.source, self.dest, self.proc.pid)

    def check(self) -> str:
        """Current health: ok, not-mounted, disconnected, hung, process-dead, error: ..."""
        if self.proc is not None and self._supervisor is None:
            self.refresh()
        if self.proc is None:
            self.health = "stopped"
        elif not self.proc.alive():
            self.health = "process-dead"
        elif mountinfo(self.dest) is None:
            self.health = "not-mounted"
        else:
            self.health = self._probe(self.dest, self.options.stat_timeout)
        return self.health

    def heal(self) -> bool:
        """Remount if unhealthy; True if a remount was made.

        Several processes may use one mount point (see :mod:`guestagent.storage.mountrefs`);
        only its supervisor remounts: the process holding the point's supervision flock,
        first the one that made the mount, and once it lets go or dies (the kernel drops
        the lock) whichever other user checks next. Two supervisors would each see the
        other's fresh rclone as "not ours" and replace it in turn; the others only report.
        A remount holds the point's record lock, so it never races the last user's
        unmount, and happens only while some user still counts on the mount."""
        if self.proc is None or not self.supervise():
            return False
        with self.refs.holding(str(self.dest)) as record, self._lock:
            if record is None or not record.users or self.check() == "ok":
                self._hung = 0
                return False
            return self._remount()

    def _remount(self) -> bool:
        assert self.proc is not None
        if self.health == "hung":
            # A slow answer is not yet a dead mount: remount after several in a row.
            self._hung += 1
            if self._hung < HUNG_CHECKS:
                return False
        self._hung = 0
        log.warning("mount %s at %s is %s: remounting", self.source, self.dest, self.health)
        self.proc.stop(2.0)
        try:
            self._spawn()
        except StorageError as exc:
            self.last_error = str(exc)
            return False
        self.remounts += 1
        return True

    def supervise(self) -> bool:
        """True if this process supervises the mount (taking it over if nobody does)."""
        if self._supervisor is None:
            self._supervisor = self.refs.supervise(str(self.dest))
            if self._supervisor is not None:
                self.refresh()  # the last supervisor may have remounted since we looked
        return self._supervisor is not None

    def let_go(self) -> None:
        """Stop supervising (another user's process takes over at its next check)."""
        fd, self._supervisor = self._supervisor, None
        if fd is not None:
            os.close(fd)

    def refresh(self) -> None:
        """Follow the recorded rclone: another process may have remounted."""
        record = read_record(self.record_path)
        if record is None or record.get("dest") != str(self.dest):
            return
        pid = int(record.get("pid") or 0)
        if self.proc is None or pid != self.proc.pid:
            self.adopt(record)

    def stop(self, grace: float = 5.0) -> None:
        """Lazy unmount (busy files keep working until closed), then end rclone."""
        with self._lock:
            lazy_unmount(self.dest)
            if self.proc is not None:
                self.proc.stop(grace)
            if not isinstance(self.proc, _Detached):
                # Its detached work is gone already: forget its record and env file too.
                gone = detached.Detached(self.work_name, "none", None)
                gone.stop(0.0, run_dir=self.options.run_dir)
            self.proc = None
            self.health = "stopped"
            with contextlib.suppress(FileNotFoundError):
                self.record_path.unlink()
            self.let_go()
            log.info("unmounted %s", self.dest)

    def adopt(self, record: Mapping[str, Any]) -> None:
        work = detached.adopt(self.work_name, run_dir=self.options.run_dir)
        if work is not None:
            self.proc = _Detached(work, self.options.run_dir)
        else:  # gone, or a record from before mounts were detached: checked by pid
            self.proc = _Adopted(int(record.get("pid", 0)), str(record.get("started", "")))
        self.remounts = int(record.get("remounts", 0))

    def _write_record(self) -> None:
        assert self.proc is not None
        atomic_write(self.record_path, json.dumps(self.describe()), mode=0o600)

    def describe(self) -> dict[str, Any]:
        pid = self.proc.pid if self.proc is not None else None
        out: dict[str, Any] = {
            "source": str(self.source), "dest": str(self.dest), "kind": "oss",
            "origin": self.origin, "pid": pid, "started": proc_start(pid) if pid else "",
            "health": self.health, "remounts": self.remounts, "log": str(self.log_path),
            "rclone": self.remote.rclone, "users": self.refs.users(str(self.dest)),
        }
        if self.last_error:
            out["error"] = self.last_error
        return out


class MountTable:
    """The mounts one process uses, each with the users it counts in for them (host-wide in
    :class:`MountRefs`): made or joined, checked, healed (when supervising), released."""

    def __init__(self) -> None:
        self._mounts: dict[Path, Mount] = {}
        self._users: dict[Path, list[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._mounts)

    def mounts(self) -> list[Mount]:
        with self._lock:
            return list(self._mounts.values())

    def add(self, mount: Mount, user: str | None = None) -> Mount:
        """Count ``user`` (default: this process) in at ``mount.dest``: mount it if no one
        has, else join the mount there (the same source, read-only) and adopt its rclone.
        A conflicting or nested mount point is refused before anything is mounted. The
        Mount object that serves ``user`` (an earlier one of this table's, if any)."""
        user = user or process_user(mount.origin)
        with self._lock:
            held = self._mounts.setdefault(mount.dest, mount)
            self._users.setdefault(mount.dest, [])
        try:
            _from_before_counts(held)
            made = held.refs.acquire(mount.claim(user), lambda: _make(held),
                                     lambda: mountinfo(held.dest) is not None)
        except BaseException:
            with self._lock:
                if not self._users.get(held.dest):
                    self._mounts.pop(held.dest, None)
                    self._users.pop(held.dest, None)
            raise
        if not made and held.proc is None:
            _join(held)
        with self._lock:
            self._mounts.setdefault(held.dest, held)
            users = self._users.setdefault(held.dest, [])
            if user not in users:
                users.append(user)
        return held

    def release(self, dest: Path, grace: float = 5.0, user: str | None = None) -> bool:
        """Count ``user`` (default: every user this table holds there) out of ``dest``; the
        last user host-wide unmounts. False if this table holds nothing there."""
        with self._lock:
            mount = self._mounts.get(Path(dest))
            if mount is None:
                return False
            held = self._users.get(mount.dest, [])
            gone = [u for u in held if user in (None, u)]
            left = [u for u in held if u not in gone]
            self._users[mount.dest] = left
            if not left:
                self._mounts.pop(mount.dest, None)
                self._users.pop(mount.dest, None)
        for one in gone:
            _count_out(mount, one, grace)
        if not left:
            mount.let_go()
        return True

    def check_all(self) -> int:
        """Heal every unhealthy mount this process supervises; the number remounted."""
        return sum(1 for m in self.mounts() if m.heal())

    def watch(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.wait(interval):
            try:
                self.check_all()
            except Exception as exc:  # a check must never end the watch
                log.warning("mount check failed: %s", exc)

    def stop_all(self, grace: float = 5.0) -> None:
        for mount in self.mounts():
            self.release(mount.dest, grace)

    def let_go_all(self) -> None:
        """Leave every mount as it is, unsupervised by this process (an agent restart:
        the next agent, or another user, takes over)."""
        for mount in self.mounts():
            mount.let_go()

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.mounts()]


def _make(mount: Mount) -> str | None:
    """The first user's mount; it supervises it from now on."""
    mount.start()
    mount.supervise()
    return None


def _from_before_counts(mount: Mount) -> None:
    """A live mount recorded by an agent from before the counts (an upgrade): ours, so
    it gets a record with no user yet, which the users then join."""
    record = read_record(mount.record_path)
    if (record is not None and record.get("dest") == str(mount.dest)
            and mountinfo(mount.dest) is not None
            and mount.refs.record(str(mount.dest)) is None):
        mount.refs.adopt(Claim(str(mount.dest), str(record.get("source")), "ro", ""))


def _join(mount: Mount) -> None:
    """Serve a mount another user made: follow its rclone; heal it now if it is unwell
    and nobody else supervises it."""
    mount.refresh()
    if mount.proc is None:  # its process record is lost: supervised as a dead process
        mount.proc = _Adopted(0, "")
    if mount.check() == "ok":
        log.info("adopted mount %s at %s (its rclone, pid %s)", mount.source, mount.dest,
                 mount.proc.pid)
        return
    mount.heal()


def _count_out(mount: Mount, user: str, grace: float) -> None:
    def unmount(_record: object) -> None:
        mount.refresh()
        mount.stop(grace)

    if mount.refs.release(str(mount.dest), user, unmount) is None:
        mount.stop(grace)  # a mount made before the counts: ours alone


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def records(run_dir: Path) -> Iterator[dict[str, Any]]:
    folder = run_dir / "mounts"
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        doc = read_record(path)
        if doc is not None:
            yield doc


def _user_allow_other() -> bool:
    try:
        lines = FUSE_CONF.read_text().splitlines()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in lines)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


_RCLONE_STAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d [A-Z]+\s*: ")


def _short(text: str) -> str:
    """One line of rclone's stderr without its date and level (noise in our message)."""
    return _RCLONE_STAMP.sub("", " ".join(text.split()))[:300]


__all__ = ["Mount", "MountTable", "Options", "RcloneRemote", "lazy_unmount", "mountinfo",
           "proc_start", "records"]
