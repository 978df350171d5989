"""``migrate start``: the run handed to the agent daemon, so it outlives the user's session.

``start`` writes a job file (``<jobs_dir>/job.json``: which config, tree and excludes);
the daemon's ``migrate`` service notices it and runs ``guestagent migrate run`` as a child
in its own process group, recording the child's pid in the job. After an agent restart the
service adopts a child that is still running; after a reboot it starts the run again, which
resumes from ``client_data``. Progress is read by ``migrate status`` from ``client_data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.files import atomic_write
from guestagent.migrate.settings import MigrateSettings
from guestagent.migrate.userconfig import UserConfig
from guestagent.service import Service

log = logging.getLogger(__name__)

JOB_FILE = "job.json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def jobs_dir(state_dir: Path) -> Path:
    return state_dir / "migrate"


def submit(args: argparse.Namespace, config: UserConfig, jobs: Path) -> int:
    job = {"config": str(config.path), "root": str(Path(args.root).resolve()),
           "excludes": str(Path(args.excludes).resolve()) if args.excludes else None,
           "state": "queued", "submitted_at": _now(), "pid": 0}
    current = read_job(jobs)
    if current and current.get("state") == "running" and _alive(int(current.get("pid", 0))):
        print(f"guestagent: a migration is already running (pid {current['pid']}, config "
              f"{current['config']}); follow it with `guestagent migrate status`",
              file=sys.stderr)
        return 2
    write_job(jobs, job)
    print(f"migration queued for the agent daemon ({jobs / JOB_FILE}); follow it with "
          f"`guestagent migrate status --config {config.path}`")
    return 0


def read_job(jobs: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((jobs / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_job(jobs: Path, job: dict[str, Any]) -> None:
    jobs.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(jobs / JOB_FILE, json.dumps(job, indent=2) + "\n", mode=0o600)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"migrate" in cmdline and b"guestagent" in cmdline


class MigrateService(Service):
    """Runs queued migrations; one at a time."""

    name = "migrate"

    def __init__(self, settings: MigrateSettings, jobs: Path,
                 config_path: str | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.config_path = config_path
        self.child: process.Child | None = None
        self.job: dict[str, Any] | None = None

    def run(self, stop: threading.Event) -> None:
        # wait() beats: the idle loop is a live loop for the daemon's watchdog.
        while not self.wait(stop, self.settings.job_poll_interval):
            self.tick()

    def tick(self) -> None:
        job = read_job(self.jobs)
        self.job = job
        if job is None or job.get("state") in ("finished", "not finished"):
            return
        if self.child is not None:
            code = self.child.poll()
            if code is None:
                return
            self.child = None
            if not job.get("unit"):
                self._finished(job, code)
                return
        if job.get("state") == "running" and self._running(job):
            return  # ours, or adopted from an earlier agent: still at work
        if job.get("state") == "running" and job.get("unit"):
            self._finished(job, None)
            return
        self._launch(job)

    def _running(self, job: dict[str, Any]) -> bool:
        unit = job.get("unit")
        if unit:
            res = process.run(["systemctl", "is-active", "--quiet", unit], timeout=30)
            return res.returncode == 0
        return _alive(int(job.get("pid") or 0))

    def _launch(self, job: dict[str, Any]) -> None:
        argv = [sys.executable, "-m", "guestagent"]
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["migrate", "run", "--config", job["config"], "--root", job["root"]]
        if job.get("excludes"):
            argv += ["--excludes", job["excludes"]]
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        unit = None
        if Path("/run/systemd/system").is_dir() and shutil.which("systemd-run"):
            # Under systemd the run gets its own transient unit: outside the agent's cgroup
            # (an agent stop or restart does not kill it) and its PrivateTmp.
            unit = f"guestagent-migrate-{datetime.now(UTC):%Y%m%d%H%M%S}"
            setenv = [f"--setenv={k}={v}" for k, v in env.items() if k.startswith("GUESTAGENT_")]
            argv = ["systemd-run", f"--unit={unit}", "--quiet", "--collect",
                    "--property=KillMode=mixed", *setenv, *argv]
        self.child = process.spawn(argv, name="migrate", env=env,
                                   log_path=self.jobs / "run.log")
        job.update(state="running", pid=self.child.pid, unit=unit, started_at=_now())
        write_job(self.jobs, job)
        log.warning("migration started (%s, config %s)", unit or f"pid {self.child.pid}",
                    job["config"])

    def _finished(self, job: dict[str, Any], code: int | None) -> None:
        """The run ended: its outcome is what client_data says (the exit code of a unit
        run by an earlier agent is not ours to see)."""
        from guestagent.migrate.state import State

        try:
            result = State.load(Path(job["config"]).parent).result
        except ValueError:
            result = ""
        ok = result == "finished" if code is None else code == 0
        job.update(state="finished" if ok else "not finished", exit=code, ended_at=_now(),
                   pid=0)
        write_job(self.jobs, job)
        (log.warning if ok else log.error)("migration ended: %s (exit %s)", job["state"], code)

    def drain(self, deadline: float) -> None:
        # The run resumes from client_data; a drain only leaves the child to its end.
        return

    def status(self) -> dict[str, Any]:
        job = self.job or {}
        return {k: job.get(k) for k in ("state", "config", "pid", "exit") if job.get(k)}

    def summary(self) -> str | None:
        job = self.job or {}
        if not job:
            return None
        return f"migration {job.get('state')} ({job.get('config')})"

    def healthy(self) -> bool:
        return (self.job or {}).get("state") != "not finished"

    def problem(self) -> str | None:
        job = self.job or {}
        if job.get("state") == "not finished":
            return (f"migration not finished (exit {job.get('exit')}): see "
                    f"`guestagent migrate status --config {job.get('config')}`")
        return None
