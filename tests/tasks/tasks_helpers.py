"""Shared helpers of the task tests: a scheduler on a temp state dir, job documents, the
agent daemon with its tasks service and the ``tasks`` CLI against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guestagent.daemon.localrun import AgentProcess, local_config
from guestagent.tasks import submit
from guestagent.tasks.model import Job
from guestagent.tasks.runner import HostRunner, Runner
from guestagent.tasks.scheduler import Identity, Scheduler
from guestagent.tasks.settings import TasksSettings
from guestagent.tasks.store import Store


def make_scheduler(root: Path, runners: dict[str, Runner] | None = None,
                   storage: Any = None, minter: Any = None, **settings: Any) -> Scheduler:
    store = Store(root / "tasks.db")
    defaults: dict[str, Any] = {"max_parallel": 2, "kill_grace": 2.0}
    defaults.update(settings)
    return Scheduler(store, TasksSettings(**defaults), root / "jobs",
                     runners or {"host": HostRunner()},
                     identity=Identity("oss-cn-hangzhou-internal.aliyuncs.com", "cn-hangzhou",
                                       "local", "i-test"),
                     storage=(lambda: storage) if storage is not None else _no_storage,
                     minter=minter)


def _no_storage() -> Any:
    raise AssertionError("this test uses no OSS")


def task(cmd: str, **fields: Any) -> dict[str, Any]:
    env = fields.pop("EnvVars", {})
    params = {"Command": {"CommandLine": cmd, "EnvVars": env}}
    params.update(fields.pop("Parameters", {}))
    return {"Parameters": params, **fields}


def job_doc(tasks: dict[str, Any], deps: dict[str, list[str]] | None = None,
            **fields: Any) -> dict[str, Any]:
    return {"Name": "test-job", "Type": "DAG", **fields,
            "DAG": {"Tasks": tasks, "Dependencies": deps or {}}}


def submit_doc(sched: Scheduler, doc: dict[str, Any]) -> str:
    doc = json.loads(json.dumps(doc))
    job = Job.parse(doc)
    job_id, _ = submit.create_from(sched.store, sched.jobs_dir, job, doc,
                                   sched.settings.max_timeout)
    return job_id


needs_fuse = pytest.mark.skipif(
    shutil.which("rclone") is None or not Path("/dev/fuse").exists() or os.geteuid() != 0,
    reason="needs rclone, /dev/fuse and root",
)


def start_agent(emulator: Any, workdir: Path, **tasks: Any) -> AgentProcess:
    """The agent daemon on the emulator (user-data off, two instances at once), started;
    ``tasks`` adds to its [tasks] section. The caller stops it."""
    cfg = local_config(emulator.url, workdir)
    cfg["userdata"] = {"enabled": False}
    cfg["tasks"] = {"max_parallel": 2, "kill_grace": 2.0, **tasks}
    workdir.mkdir(parents=True, exist_ok=True)
    return AgentProcess(cfg, workdir).start(wait=60)


def agent_cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``guestagent tasks ARGS`` against ``agent`` (no GUESTAGENT_* of the test's own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
    return subprocess.run([sys.executable, "-m", "guestagent", "--config",
                           str(agent.config_path), "tasks", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def submit_job(agent: AgentProcess, tmp_path: Path, doc: dict[str, Any]) -> str:
    """Submit ``doc`` to the agent (not waiting for it); its job id."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps(doc))
    done = agent_cli(agent, "submit", str(job))
    assert done.returncode == 0, done.stderr + agent.log()[-2000:]
    return done.stdout.strip()


def shown(agent: AgentProcess, job_id: str) -> dict[str, Any]:
    """``tasks show JOB --json``, parsed."""
    out = agent_cli(agent, "show", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))
