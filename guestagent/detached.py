"""Work that must outlive an agent restart: FUSE mount processes, task containers, a
migration transfer.

- systemd is PID 1: the work runs as a transient service unit
  (``systemd-run --unit guestagent-<name> --collect``), outside the agent's cgroup, so
  neither the unit's ``KillMode=mixed`` at a stop nor a watchdog restart touches it. The
  next agent re-adopts it by unit name (:func:`adopt`). Its environment goes through a
  0600 ``EnvironmentFile`` (never argv), removed as soon as the process runs (it may hold
  a secret); its output is appended to ``log_path`` (errors to ``stderr_path`` if given).
- no systemd (a container, a minimal image): the work is a child in its own session that
  nothing kills with the agent (no death signal, no tag for
  :func:`guestagent.process.end_orphans`), recorded in ``<run_dir>/detached/<name>.json``
  (pid and start time, so a reused pid is never taken for it) and re-adopted from there.
  An agent restart there kills nothing anyway; at shutdown, the init's final kill ends it.

``guestagent status`` reports which of the two it found (``init``: ``systemd``/``none``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from guestagent import process
from guestagent.files import atomic_write

log = logging.getLogger(__name__)

UNIT_PREFIX = "guestagent-"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


def init_system() -> str:
    return "systemd" if process.systemd_running() else "none"


@dataclass
class Detached:
    name: str
    init: str  # "systemd" or "none"
    pid: int | None
    started: float | None = None  # process start time (psutil), "none" only

    @property
    def unit(self) -> str | None:
        return f"{UNIT_PREFIX}{self.name}.service" if self.init == "systemd" else None

    def running(self) -> bool:
        if self.unit is not None:
            return process.run(["systemctl", "is-active", "--quiet", self.unit],
                               timeout=30).ok
        return self.pid is not None and _same_process(self.pid, self.started)

    def stop(self, grace: float = 5.0, run_dir: Path | None = None) -> None:
        """End it (TERM, ``grace`` seconds, KILL) and forget it."""
        if self.unit is not None:
            process.run(["systemctl", "stop", self.unit], timeout=grace + 30)
        elif self.pid is not None and _same_process(self.pid, self.started):
            _end(self.pid, grace)
        if run_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                _record(run_dir, self.name).unlink()
            with contextlib.suppress(FileNotFoundError):
                _env_file(run_dir, self.name).unlink()


def start(name: str, argv: Sequence[str], *, run_dir: Path,
          env: Mapping[str, str] | None = None, cwd: str | None = None,
          log_path: str | os.PathLike[str] | None = None,
          stderr_path: str | os.PathLike[str] | None = None) -> Detached:
    """Start ``argv`` so that it outlives the agent; ``name`` identifies it for adoption."""
    if not NAME.fullmatch(name):
        raise ValueError(f"detached work name {name!r}: use letters, digits, '.', '_', '-'")
    if process.systemd_running():
        # No `systemctl show` first: systemd-run itself refuses a unit name in use, and
        # only then do we ask what runs under it (a task starts hundreds of these).
        return _start_unit(name, argv, run_dir, env=env, cwd=cwd, log_path=log_path,
                           stderr_path=stderr_path)
    if adopt(name, run_dir=run_dir) is not None:  # without systemd: one file read
        raise ValueError(f"detached work {name!r} is already running: adopt or stop it")
    child = process.spawn(argv, name=name, env=env, cwd=cwd, log_path=log_path,
                          stderr_path=stderr_path, survive_agent=True)
    started = _start_time(child.pid)
    # Not fsynced: a kill -9 of the agent keeps the page cache, so the next agent reads
    # the record; a power cut loses it, but then the process it names is gone as well.
    atomic_write(_record(run_dir, name),
                 json.dumps({"pid": child.pid, "started": started}) + "\n", mode=0o600,
                 durable=False)
    log.info("started %s (pid %s) outside the agent's life", name, child.pid)
    return Detached(name, "none", child.pid, started)


def adopt(name: str, *, run_dir: Path) -> Detached | None:
    """The running work called ``name`` from before a restart, or None."""
    if process.systemd_running():
        unit = f"{UNIT_PREFIX}{name}.service"
        res = process.run(["systemctl", "show", "-p", "ActiveState,MainPID", unit], timeout=30)
        props = dict(line.split("=", 1) for line in res.text().splitlines() if "=" in line)
        if props.get("ActiveState") not in ("active", "activating", "reloading"):
            return None
        pid = int(props.get("MainPID", "0") or 0)
        return Detached(name, "systemd", pid or None)
    try:
        data = json.loads(_record(run_dir, name).read_text())
        pid, started = int(data["pid"]), float(data["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _same_process(pid, started):
        return None
    return Detached(name, "none", pid, started)


def _start_unit(name: str, argv: Sequence[str], run_dir: Path, *,
                env: Mapping[str, str] | None, cwd: str | None,
                log_path: str | os.PathLike[str] | None,
                stderr_path: str | os.PathLike[str] | None = None) -> Detached:
    unit = f"{UNIT_PREFIX}{name}"
    cmd = ["systemd-run", f"--unit={unit}", "--collect", "--quiet", "--service-type=exec",
           f"--description=guestagent detached work {name}"]
    if env:
        path = _env_file(run_dir, name)
        # Not fsynced: read by systemd at once and removed right after (run dir, a tmpfs).
        atomic_write(path, "".join(f'{k}="{_quote(v)}"\n' for k, v in env.items()),
                     mode=0o600, durable=False)
        cmd.append(f"--property=EnvironmentFile={path}")
    if cwd:
        cmd.append(f"--working-directory={cwd}")
    if log_path is not None:
        cmd.append(f"--property=StandardOutput=append:{log_path}")
    if stderr_path is not None or log_path is not None:
        cmd.append(f"--property=StandardError=append:{stderr_path or log_path}")
    try:
        process.run([*cmd, "--", *argv], timeout=60, check=True)
    except process.ProcessError:
        if adopt(name, run_dir=run_dir) is not None:  # what made systemd-run refuse
            raise ValueError(f"detached work {name!r} is already running: adopt or stop it"
                             ) from None
        raise
    finally:
        # With --service-type=exec systemd-run returns once the process runs: systemd has
        # read the file (a transient unit with no Restart= never reads it again).
        with contextlib.suppress(FileNotFoundError):
            _env_file(run_dir, name).unlink()
    found = adopt(name, run_dir=run_dir)
    log.info("started %s as %s.service outside the agent's cgroup", name, unit)
    return found or Detached(name, "systemd", None)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _record(run_dir: Path, name: str) -> Path:
    return run_dir / "detached" / f"{name}.json"


def _env_file(run_dir: Path, name: str) -> Path:
    return run_dir / "detached" / f"{name}.env"


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _same_process(pid: int, started: float | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 0.01
    except psutil.Error:
        return False


def _end(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and _same_process(pid, None):
        process.reap_adopted()
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    process.reap_adopted()
