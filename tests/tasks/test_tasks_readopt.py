"""Re-adoption after an agent restart keeps an instance's task-scoped credentials: the
daemon is killed (-9) twice while a host instance and a container run; each is adopted
(run once), its credential request from inside — with the URL and token it was started
with — succeeds afterwards, and once it ended the same token is refused. No token is ever
in the task state. (A ``systemctl restart`` is proven under a booted systemd:
tests/system/test_system_tasks.py; without systemd a SIGTERM is a stop, which drains.)"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import job_doc, shown, start_agent, submit_job, task

from guestagent.credentials.local import UnixHTTPConnection, local_get
from guestagent.daemon.localrun import AgentProcess

pytestmark = pytest.mark.slow

# The host instance: says it runs, waits for the test's gate (it outlives the agent
# restarts meanwhile), then asks for credentials exactly as its SDK would.
HOST_BODY = """
import json, os, sys, time, urllib.request as u
keys = ("ALIBABA_CLOUD_CREDENTIALS_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN")
open("env.json", "w").write(json.dumps({k: os.environ[k] for k in keys}))
with open(sys.argv[1], "a") as runs:
    runs.write("run\\n")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
ali = u.urlopen(os.environ["ALIBABA_CLOUD_CREDENTIALS_URI"]).read()
aws = u.urlopen(u.Request(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={
    "Authorization": os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})).read()
open("creds.json", "w").write(json.dumps([json.loads(ali), json.loads(aws)]))
"""

CONTAINER_BODY = (
    "sh -c 'cd /batchcompute/workdir; env | grep -E \"^(ALIBABA|AWS)_\" > env.txt; "
    "echo run >> runs; while [ ! -e gate ]; do sleep 0.1; done; "
    "wget -qO ali.json \"$ALIBABA_CLOUD_CREDENTIALS_URI\" || echo ali-failed >> errors; "
    "wget -qO aws.json --header \"Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN\" "
    "\"$AWS_CONTAINER_CREDENTIALS_FULL_URI\" || echo aws-failed >> errors'")


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    try:
        yield made
    finally:
        for agent in made:
            agent.stop()


def restart_twice(agent: AgentProcess) -> None:
    """kill -9 and a start, twice (the second agent re-adopts what the first re-adopted)."""
    for _ in range(2):
        agent.kill()
        agent.start(wait=60)


def over_socket(agent: AgentProcess, url: str, token: str) -> int:
    """The status the credential server gives the instance's own path and token, asked
    over its Unix socket as root (past the relay: the server's own verdict)."""
    path = "/" + url.split("/", 3)[3]
    conn = UnixHTTPConnection(agent.config["credentials"]["socket_path"], timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": token})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def host_key(agent: AgentProcess) -> str:
    """The instance role's current AccessKeyId, from the host endpoint."""
    conn = UnixHTTPConnection(agent.config["credentials"]["socket_path"], timeout=30)
    return str(local_get(conn, "/v1/credentials/aws")["AccessKeyId"])


def until(agent: AgentProcess, cond: Any, timeout: float) -> None:
    """wait_for, failing with the agent's log (what it did about the instance)."""
    try:
        wait_for(cond, timeout=timeout, tolerate=(OSError,))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; agent log:\n{agent.log()[-6000:]}") from None


def assert_no_secret_stored(agent: AgentProcess, token: str, url: str) -> None:
    secret_path = url.split("/")[3]
    for path in (agent.state_dir / "tasks").rglob("*"):
        if path.is_file() and "workdir" not in path.parts:
            data = path.read_bytes()
            assert token.encode() not in data, path
            assert secret_path.encode() not in data, path


def test_host_instance_keeps_its_credentials_across_restarts(
    emulator: Any, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = start_agent(emulator, tmp_path / "agent")
    agents.append(agent)
    script, runs, gate = tmp_path / "instance.py", tmp_path / "runs", tmp_path / "gate"
    script.write_text(HOST_BODY)
    job_id = submit_job(agent, tmp_path, job_doc(
        {"hold": task(f"{sys.executable} {script} {runs} {gate}")}))
    work = agent.state_dir / "tasks" / "jobs" / job_id / "hold" / "0" / "workdir"
    wait_for(lambda: runs.exists() and (work / "env.json").exists(), timeout=120)
    env = json.loads((work / "env.json").read_text())
    url, token = env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], env["AWS_CONTAINER_AUTHORIZATION_TOKEN"]

    restart_twice(agent)
    # Re-adopted: its endpoint answers again, to its own token only.
    until(agent, lambda: over_socket(agent, url, token) == 200, timeout=120)
    assert over_socket(agent, url, "not-" + token) == 401
    gate.touch()
    wait_for(lambda: shown(agent, job_id)["state"] in ("Finished", "Failed"), timeout=120)
    assert shown(agent, job_id)["state"] == "Finished", agent.log()[-3000:]
    ali, aws = json.loads((work / "creds.json").read_text())
    assert ali["Code"] == "Success" and aws["AccessKeyId"] == ali["AccessKeyId"] == host_key(agent)
    assert runs.read_text().split() == ["run"]  # adopted, never started twice

    # Ended: the same URL and token open nothing, through the relay or past it.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": token}))
    assert info.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(env["ALIBABA_CLOUD_CREDENTIALS_URI"])
    assert info.value.code == 403
    assert over_socket(agent, url, token) != 200
    assert_no_secret_stored(agent, token, url)


def test_container_keeps_its_credentials_across_restarts(
    emulator: Any, tmp_path: Path, agents: list[AgentProcess], docker_engine: Any,
    busybox_image: str,
) -> None:
    agent = start_agent(emulator, tmp_path / "agent", docker_host=docker_engine.host)
    agents.append(agent)
    job_id = submit_job(agent, tmp_path, job_doc({"inside": task(
        CONTAINER_BODY, EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": busybox_image})}))
    work = agent.state_dir / "tasks" / "jobs" / job_id / "inside" / "0" / "workdir"
    wait_for(lambda: (work / "runs").exists() and (work / "env.txt").exists(), timeout=180)
    env = dict(line.split("=", 1) for line in (work / "env.txt").read_text().splitlines()
               if "=" in line)
    url, token = env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], env["AWS_CONTAINER_AUTHORIZATION_TOKEN"]

    restart_twice(agent)
    until(agent, lambda: over_socket(agent, url, token) == 200, timeout=120)
    (work / "gate").touch()
    wait_for(lambda: shown(agent, job_id)["state"] in ("Finished", "Failed"), timeout=180)
    assert shown(agent, job_id)["state"] == "Finished", agent.log()[-3000:]
    assert not (work / "errors").exists(), (work / "errors").read_text()
    ali = json.loads((work / "ali.json").read_text())
    aws = json.loads((work / "aws.json").read_text())
    assert ali["Code"] == "Success" and aws["AccessKeyId"] == ali["AccessKeyId"] == host_key(agent)
    assert (work / "runs").read_text().split() == ["run"]
    # Ended: its path and token are refused by the server.
    assert over_socket(agent, url, token) != 200
    assert_no_secret_stored(agent, token, url)
