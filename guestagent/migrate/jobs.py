"""``migrate start``: the run handed to the agent daemon, so it outlives the user's session.

``start`` writes a job file (``<jobs_dir>/job.json``: which config, tree and excludes);
the daemon's ``migrate`` service notices it and runs ``guestagent migrate run`` as detached
work (:mod:`guestagent.detached`): under systemd a transient unit
``guestagent-migrate.service`` outside the agent's cgroup, so an agent stop or restart does
not touch it and the next agent adopts it by name. When the run is gone without a verdict
in ``client_data`` — the machine rebooted, or it was killed — the service starts it again,
and it resumes from ``client_data`` (rsync keeps the partial file on the receiver, so bytes
already sent are matched, not sent again). Progress is read by ``migrate status``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestagent import detached, process
from guestagent.files import atomic_write
from guestagent.migrate.settings import MigrateSettings
from guestagent.migrate.userconfig import UserConfig
from guestagent.service import Service

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
WORK_NAME = "migrate"  # the detached work's name: unit guestagent-migrate.service
ENDED = ("finished", "not finished")
# A run that died without a verdict in the same boot (killed, crashed) is started again
# this many times at most; after a reboot it is always resumed.
MAX_SAME_BOOT_LAUNCHES = 3
# The agent's own systemd plumbing is not the run's.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES", "JOURNAL_STREAM", "INVOCATION_ID")
# Under systemd the environment goes through a file (detached.py): only what the run needs
# (the agent's settings overrides and the locale), never whatever else the agent was given.
_UNIT_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH")
_UNIT_ENV_PREFIXES = ("GUESTAGENT_", "LC_")


def run_environment(under_systemd: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    if under_systemd:
        env = {k: v for k, v in env.items()
               if k in _UNIT_ENV or k.startswith(_UNIT_ENV_PREFIXES)}
    return env


def boot_id() -> str:
    """This boot of this system: the kernel's boot id and when PID 1 started (a container
    shares the kernel with its host, and its reboot starts a new init, not a new kernel)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/1/stat"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        # /proc/1/stat: field 22 (after the parenthesised command) is its start time.
        parts.append(text.strip() if "(" not in text else text.rsplit(")", 1)[1].split()[19])
    return ":".join(parts)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def jobs_dir(state_dir: Path) -> Path:
    return state_dir / "migrate"


def submit(args: argparse.Namespace, config: UserConfig, jobs: Path) -> int:
    job = {"config": str(config.path), "root": str(Path(args.root).resolve()),
           "excludes": str(Path(args.excludes).resolve()) if args.excludes else None,
           "state": "queued", "submitted_at": _now(), "pid": 0}
    current = read_job(jobs)
    if current and current.get("state") == "running" and detached.adopt(WORK_NAME,
                                                                        run_dir=jobs):
        print(f"guestagent: a migration is already running (config "
              f"{current.get('config')}); follow it with `guestagent migrate status "
              f"--config {current.get('config')}`", file=sys.stderr)
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


class MigrateService(Service):
    """Runs queued migrations, one at a time, as detached work."""

    name = "migrate"

    def __init__(self, settings: MigrateSettings, jobs: Path,
                 config_path: str | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.config_path = config_path
        self.work: detached.Detached | None = None
        self.job: dict[str, Any] | None = None

    def run(self, stop: threading.Event) -> None:
        # wait() beats: the idle loop is a live loop for the daemon's watchdog.
        while not self.wait(stop, self.settings.job_poll_interval):
            self.tick()

    def tick(self) -> None:
        job = read_job(self.jobs)
        self.job = job
        if job is None or job.get("state") in ENDED:
            return
        if job.get("state") == "running":
            if self._running():
                return
            verdict = self._verdict(job)
            if verdict in ENDED:
                self._finished(job, verdict)
                return
            same_boot = job.get("boot_id") == boot_id()
            if same_boot and int(job.get("launches") or 0) >= MAX_SAME_BOOT_LAUNCHES:
                self._finished(job, "not finished",
                               f"the run ended {job['launches']} times without a result; "
                               f"see {self.jobs / 'run.log'}")
                return
            log.warning("migration interrupted (%s): resuming it",
                        "the run ended early" if same_boot else "reboot")
        self._launch(job)

    def _running(self) -> bool:
        """Whether the run is at work: ours, or adopted from an earlier agent by name."""
        process.reap_adopted()
        if self.work is None or not self.work.running():
            self.work = detached.adopt(WORK_NAME, run_dir=self.jobs)
        return self.work is not None

    def _verdict(self, job: dict[str, Any]) -> str:
        from guestagent.migrate.state import State

        try:
            return State.load(Path(job["config"]).parent).result
        except ValueError:
            return ""

    def _launch(self, job: dict[str, Any]) -> None:
        argv = [sys.executable, "-m", "guestagent"]
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["migrate", "run", "--config", job["config"], "--root", job["root"]]
        if job.get("excludes"):
            argv += ["--excludes", job["excludes"]]
        env = run_environment(process.systemd_running())
        self.work = detached.start(WORK_NAME, argv, run_dir=self.jobs, env=env,
                                   log_path=self.jobs / "run.log")
        now_boot = boot_id()
        launches = int(job.get("launches") or 0) + 1 if job.get("boot_id") == now_boot else 1
        job.update(state="running", pid=self.work.pid or 0, unit=self.work.unit,
                   boot_id=now_boot, launches=launches, started_at=_now())
        job.setdefault("first_started_at", job["started_at"])
        write_job(self.jobs, job)
        log.warning("migration started (%s, config %s)",
                    self.work.unit or f"pid {self.work.pid}", job["config"])

    def _finished(self, job: dict[str, Any], verdict: str, why: str = "") -> None:
        """The run ended: its outcome is what client_data says (the exit code of a unit is
        not kept once it is collected)."""
        job.update(state=verdict, ended_at=_now(), pid=0)
        if why:
            job["error"] = why
        write_job(self.jobs, job)
        self.work = None
        (log.warning if verdict == "finished" else log.error)(
            "migration ended: %s%s", verdict, f" ({why})" if why else "")

    def drain(self, deadline: float) -> None:
        # The run is detached work: it goes on across an agent stop and resumes anyway.
        return

    def status(self) -> dict[str, Any]:
        job = self.job or {}
        return {k: job.get(k) for k in ("state", "config", "pid", "unit", "launches", "error")
                if job.get(k)}

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
            return (f"migration not finished{': ' + job['error'] if job.get('error') else ''}; "
                    f"see `guestagent migrate status --config {job.get('config')}`")
        return None
