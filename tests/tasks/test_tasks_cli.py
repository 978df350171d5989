"""The CLI in the foreground (no daemon): submit/show/logs/stop, kill -9 and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import job_doc, task


@pytest.fixture
def agent_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["GUESTAGENT_CONFIG"] = str(tmp_path / "agent.toml")
    (tmp_path / "agent.toml").write_text("[tasks]\nmax_parallel = 2\nkill_grace = 2.0\n")
    env["GUESTAGENT_DAEMON_STATE_DIR"] = str(tmp_path / "state")
    env["GUESTAGENT_DAEMON_RUN_DIR"] = str(tmp_path / "run")
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guestagent", "tasks", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_job(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    return path


def test_submit_wait_show_logs(tmp_path: Path, agent_env: dict[str, str]) -> None:
    job = write_job(tmp_path, job_doc(
        {"hello": task("sh -c 'echo hello from $BATCH_COMPUTE_DAG_INSTANCE_ID; echo warn >&2'",
                       InstanceCount=2, ClusterId="cls-1")}))
    done = cli(agent_env, "submit", str(job), "--wait")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("job-") and len(job_id) == 36
    assert "select nothing" in done.stderr  # the one ClusterId notice
    shown = json.loads(cli(agent_env, "show", job_id, "--json").stdout)
    assert shown["state"] == "Finished"
    (hello,) = shown["tasks"]
    assert [(i["index"], i["state"], i["exit_code"]) for i in hello["instances"]] == [
        (0, "Finished", 0), (1, "Finished", 0)]
    assert shown["events"][-1]["event"] == "OnJobFinished"
    text = cli(agent_env, "show", job_id).stdout
    assert "hello: Finished" in text and "OnJobFinished" in text
    logs = cli(agent_env, "logs", job_id, "hello", "1")
    assert logs.stdout == "hello from 1\nwarn\n"
    listed = cli(agent_env, "list").stdout
    assert job_id in listed and "Finished" in listed


def test_refused_job_changes_nothing(tmp_path: Path, agent_env: dict[str, str]) -> None:
    job = write_job(tmp_path, job_doc({"a": task("true", InstanceCount=0)}))
    done = cli(agent_env, "submit", str(job))
    assert done.returncode == 2
    assert "InstanceCount: must be between 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert cli(agent_env, "list").stdout == ""
    missing = cli(agent_env, "show", "job-00000000000000000000000000000000")
    assert missing.returncode == 1 and "no job" in missing.stderr


def test_failed_job_exits_4(tmp_path: Path, agent_env: dict[str, str]) -> None:
    job = write_job(tmp_path, job_doc({"a": task("sh -c 'exit 9'")}))
    done = cli(agent_env, "submit", str(job), "--wait")
    assert done.returncode == 4
    assert "Failed" in done.stderr and "exited with 9" in done.stderr


def test_kill_9_mid_job_then_resume_runs_nothing_twice(
    tmp_path: Path, agent_env: dict[str, str]
) -> None:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    # Each instance records its start, then waits for the gate (opened by the test).
    body = (f"sh -c 'echo $BATCH_COMPUTE_DAG_TASK_ID.$BATCH_COMPUTE_DAG_INSTANCE_ID >> {runs}; "
            f"while [ ! -e {gate} ]; do sleep 0.1; done'")
    job = write_job(tmp_path, job_doc(
        {"first": task(body, InstanceCount=2), "second": task(body)}, {"first": ["second"]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestagent", "tasks", "submit", str(job), "--wait"],
        env=agent_env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    wait_for(lambda: runs.exists() and len(runs.read_text().split()) == 2, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    gate.touch()  # the orphaned instances finish while no agent runs
    shown = json.loads(cli(agent_env, "show", job_id, "--json").stdout)
    assert shown["state"] == "Running"
    done = cli(agent_env, "submit", "--resume", job_id, "--wait")
    assert done.returncode == 0, done.stderr
    assert sorted(runs.read_text().split()) == ["first.0", "first.1", "second.0"]
    shown = json.loads(cli(agent_env, "show", job_id, "--json").stdout)
    states = {t["name"]: [(i["state"], i["retries"]) for i in t["instances"]]
              for t in shown["tasks"]}
    assert states == {"first": [("Finished", 0), ("Finished", 0)], "second": [("Finished", 0)]}


def test_stop_from_another_process(tmp_path: Path, agent_env: dict[str, str]) -> None:
    started = tmp_path / "started"
    job = write_job(tmp_path, job_doc({"long": task(f"sh -c 'touch {started}; sleep 120'")}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestagent", "tasks", "submit", str(job), "--wait"],
        env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    wait_for(started.exists, timeout=60)
    assert cli(agent_env, "stop", job_id).returncode == 0
    assert proc.wait(60) == 4
    shown = json.loads(cli(agent_env, "show", job_id, "--json").stdout)
    assert shown["state"] == "Stopped" and shown["message"] == "stopped by the user"
    assert shown["tasks"][0]["instances"][0]["state"] == "Stopped"
