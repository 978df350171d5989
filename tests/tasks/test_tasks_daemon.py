"""The daemon's tasks service: submit hands the job over the local socket; kill -9 of
the daemon mid-job, then a restart re-adopts the running instance (run once, not twice),
and a task-scoped credential endpoint works from a host instance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import agent_cli, job_doc, shown, start_agent, submit_job, task

from guestagent.daemon.localrun import AgentProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def agent(emulator: Any, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = start_agent(emulator, tmp_path / "agent")
    try:
        yield proc
    finally:
        proc.stop()


FETCH = ("python3 -c \"import json, os, urllib.request as u; "
         "open('creds.json', 'w').write(u.urlopen("
         "os.environ['ALIBABA_CLOUD_CREDENTIALS_URI']).read().decode())\"")


def test_daemon_runs_submitted_job_with_task_credentials(
    agent: AgentProcess, tmp_path: Path
) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_doc({"fetch": task(FETCH)})))
    done = agent_cli(agent, "submit", str(job), "--wait")
    assert done.returncode == 0, done.stderr + agent.log()[-2000:]
    job_id = done.stdout.strip()
    creds = agent.state_dir / "tasks" / "jobs" / job_id / "fetch" / "0" / "workdir" / "creds.json"
    assert json.loads(creds.read_text())["Code"] == "Success"
    status = agent.service("tasks")
    assert status is not None


def test_kill_9_of_the_daemon_then_restart_adopts_the_instance(
    agent: AgentProcess, tmp_path: Path
) -> None:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    body = (f"sh -c 'echo $BATCH_COMPUTE_DAG_TASK_ID >> {runs}; "
            f"while [ ! -e {gate} ]; do sleep 0.1; done'")
    job_id = submit_job(agent, tmp_path, job_doc({"first": task(body), "second": task(body)},
                                                 {"first": ["second"]}))
    wait_for(lambda: runs.exists() and runs.read_text().split() == ["first"], timeout=60)
    agent.kill()
    gate.touch()  # the instance ends while no agent runs
    agent.start(wait=60)

    def finished() -> bool:
        return bool(shown(agent, job_id)["state"] == "Finished")

    wait_for(finished, timeout=120)
    assert runs.read_text().split() == ["first", "second"]
    tasks = shown(agent, job_id)["tasks"]
    first = tasks[0]["instances"][0] if tasks[0]["name"] == "first" else \
        tasks[1]["instances"][0]
    assert first["retries"] == 0 and first["exit_code"] == 0
