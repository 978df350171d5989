"""One disk's transfer: rsync over SSH to the intermediate instance.

rsync keeps what an interrupted run already sent (``--partial-dir``: the receiver keeps the
partial file and the next run uses it as the basis, so its bytes are matched, not sent
again), preserves hard links, ACLs, xattrs, sparse files and numeric ids, honours the
bandwidth limit, and reports its own progress (``--info=progress2``), which we turn into a
progress bar. The SSH key is a file path in argv, never the key itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guestagent import process

log = logging.getLogger(__name__)

DEFAULT_EXCLUDES = ("/dev/*", "/sys/*", "/proc/*", "/media/*", "/lost+found/*", "/mnt/*",
                    "/var/lib/lxcfs/*")
PARTIAL_DIR = ".go2aliyun-partial"
# rsync exit codes worth another attempt: socket/protocol errors (connection cut), timeouts,
# ssh failing (255), killed by a signal on the other side (20).
RETRY_CODES = frozenset({10, 11, 12, 20, 30, 35, 255})
VANISHED = 24  # files vanished while sending: the disk was in use; warn, not fail
PARTIAL_TRANSFER = 23
_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)\s+(\d+:\d\d:\d\d)")
_DENIED = re.compile(r'"([^"]+)"[^"]*Permission denied \(13\)')
_STAT = re.compile(r"^(Literal data|Matched data|Total bytes sent|Total transferred file size"
                   r"|Number of regular files transferred): ([\d,]+)", re.MULTILINE)


@dataclass(frozen=True)
class Target:
    """Where a disk goes: the intermediate instance's SSH login and the disk's mount point."""

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    dest: str


@dataclass(frozen=True)
class Progress:
    bytes: int
    percent: int
    rate: str
    eta: str


@dataclass
class Outcome:
    returncode: int
    stats: dict[str, int] = field(default_factory=dict)
    denied: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode in (0, VANISHED)

    @property
    def retryable(self) -> bool:
        return self.returncode in RETRY_CODES or self.returncode < 0


def ssh_command(target: Target) -> str:
    """The remote shell rsync runs (``-e``); every value is ours, no user text."""
    opts = ["-F", "/dev/null", "-i", str(target.key_file), "-p", str(target.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={target.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR", "-o", "Compression=no"]
    return " ".join(["ssh", *opts])


def has_sparse(source: Path, skip: list[str]) -> bool:
    """Whether any file under ``source`` has holes (fewer blocks than its size needs).

    rsync's ``--sparse`` writes in 1 KB pieces on the receiver, which costs a tree without
    holes ~20 % of throughput; it is asked for only when a hole is there to keep. ``skip``:
    top-level paths (``/proc``, ...) not to walk.
    """
    pruned = {os.path.normpath(os.path.join(source, p.strip("/*"))) for p in skip}
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in pruned]
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_size > 65536 and st.st_blocks * 512 + 65536 < st.st_size:
                    return True
    return False


class SparseScan:
    """:func:`has_sparse` in a thread: the walk of a whole root takes seconds, so a run
    starts it first and it goes on while the intermediate instance is being created."""

    def __init__(self, source: Path, skip: list[str]) -> None:
        self._found: bool | None = None
        self._thread = threading.Thread(target=self._scan, args=(source, skip),
                                        name="sparse-scan", daemon=True)
        self._thread.start()

    def _scan(self, source: Path, skip: list[str]) -> None:
        try:
            self._found = has_sparse(source, skip)
        except Exception:  # an unreadable tree: keep holes, as rsync -S would
            log.exception("looking for sparse files under %s failed", source)
            self._found = True

    def result(self) -> bool:
        self._thread.join()
        return True if self._found is None else self._found


def rsync_argv(source: Path, target: Target, excludes: Path, bwlimit: int,
               *, sparse: bool = True) -> list[str]:
    argv = ["rsync", "-aHAXS" if sparse else "-aHAX", "--numeric-ids", "--delete",
            f"--partial-dir={PARTIAL_DIR}",
            "--info=progress2", "--stats", "--no-human-readable", "--timeout=120",
            f"--exclude-from={excludes}", "-e", ssh_command(target)]
    if bwlimit > 0:
        argv.append(f"--bwlimit={bwlimit}")
    dest = target.dest.rstrip("/") + "/"
    return [*argv, str(source).rstrip("/") + "/", f"{target.user}@{target.host}:{dest}"]


def write_excludes(path: Path, patterns: list[str]) -> Path:
    from guestagent.files import atomic_write

    # Not fsynced: derived from the config and rewritten by every transfer step.
    return atomic_write(path, "".join(p + "\n" for p in patterns), mode=0o600,
                        durable=False)


def read_user_excludes(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the excludes file: {exc.strerror}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def disk_excludes(user: list[str], src_path: str, data_paths: list[str]) -> list[str]:
    """The exclude rules of one disk, patterns anchored at that disk's root.

    The system disk gets the default list, the data disks' mount points (sent separately)
    and the user's patterns; a data disk gets the user's unanchored patterns and those under
    its own mount point, re-anchored.
    """
    if src_path == "/":
        own = [p.rstrip("/") + "/*" for p in data_paths]
        return [*DEFAULT_EXCLUDES, *own, *user]
    prefix = src_path.rstrip("/") + "/"
    out = []
    for pattern in user:
        if not pattern.startswith("/"):
            out.append(pattern)
        elif pattern.startswith(prefix):
            out.append("/" + pattern[len(prefix):])
    return out


def parse_progress(line: str) -> Progress | None:
    m = _PROGRESS.match(line)
    if not m:
        return None
    return Progress(int(m.group(1).replace(",", "")), int(m.group(2)), m.group(3), m.group(4))


def parse_outcome(returncode: int, text: str) -> Outcome:
    stats = {k: int(v.replace(",", "")) for k, v in _STAT.findall(text)}
    denied = _DENIED.findall(text)
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip() and not _PROGRESS.match(ln)]
    return Outcome(returncode, stats, denied, lines[-5:])


def stop_stale(pid: int | None) -> None:
    """End an rsync left running by a killed earlier run (its own process group)."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not cmdline or not cmdline[0].endswith(b"rsync"):
        return
    log.warning("stopping rsync pid %s left by an interrupted run", pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_rsync(argv: list[str], log_path: Path, on_start: Callable[[int], None],
              on_progress: Callable[[Progress], None], poll: float = 0.5) -> Outcome:
    """Run rsync to its end, its output in ``log_path``, reporting progress as it goes."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = log_path.stat().st_size if log_path.exists() else 0
    child = process.spawn(argv, name="rsync", log_path=log_path,
                          env={**os.environ, "LC_ALL": "C"})
    on_start(child.pid)
    offset, pending = start, ""
    try:
        while True:
            code = child.wait(poll)
            chunk, offset = _read_from(log_path, offset)
            pending += chunk
            *complete, pending = re.split(r"[\r\n]", pending)
            last = next((p for p in map(parse_progress, reversed(complete)) if p), None)
            if last is not None:
                on_progress(last)
            if code is not None:
                break
    finally:
        if child.poll() is None:
            child.stop(5.0)
    text, _ = _read_from(log_path, start)
    return parse_outcome(child.returncode if child.returncode is not None else -1, text)


def _read_from(path: Path, offset: int) -> tuple[str, int]:
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    return data.decode(errors="replace"), offset + len(data)
