"""Docker mode with a real dockerd: the guide's container contract, timeouts, an image
pulled through the OSS-backed registry, a registry whose storage is down, a dockerd
restart in the middle of an instance."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dockerjobs import docker, docker_runners, push_to_path, registry_factory
from polling import wait_for
from tasks_helpers import job_doc, make_scheduler, submit_doc, task

from guestagent.credentials.service import CredentialService
from guestagent.tasks.ossregistry import OssRegistry
from guestagent.tasks.scheduler import Scheduler

pytestmark = pytest.mark.slow


def test_container_contract(tmp_path: Path, docker_engine: Any, busybox_image: str) -> None:
    sched = make_scheduler(tmp_path / "state", docker_runners(docker_engine))
    cmd = ("sh -c 'env > /batchcompute/workdir/env.txt; pwd > /batchcompute/workdir/pwd.txt; "
           "grep CapEff /proc/self/status > /batchcompute/workdir/caps.txt; "
           "echo to-stdout; echo to-stderr >&2'")
    job_id = submit_doc(sched, job_doc({"inside": task(
        cmd, InstanceCount=2, EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": busybox_image, "k1": "v1"})}))
    assert sched.run(job_id) == "Finished"
    work = sched.jobs_dir / job_id / "inside" / "1"
    env = dict(line.split("=", 1) for line in (work / "workdir" / "env.txt").read_text().split("\n")
               if "=" in line)
    assert env["USER"] == "root" and env["HOME"] == "/root"
    assert env["PWD"] == "/batchcompute/workdir"
    assert env["PATH"] == "/sbin:/usr/sbin:/bin:/usr/bin"
    assert env["BATCH_COMPUTE_DAG_JOB_ID"] == job_id
    assert env["BATCH_COMPUTE_DAG_TASK_ID"] == "inside"
    assert env["BATCH_COMPUTE_DAG_INSTANCE_ID"] == "1"
    assert env["k1"] == "v1"
    assert (work / "workdir" / "pwd.txt").read_text().strip() == "/batchcompute/workdir"
    # Not privileged: far from the full capability set.
    assert (work / "workdir" / "caps.txt").read_text().split()[1] != "000001ffffffffff"
    assert (work / "stdout").read_text() == "to-stdout\n"
    assert (work / "stderr").read_text() == "to-stderr\n"
    # Collected containers are removed.
    listed = docker(docker_engine, "ps", "-a", "-q", "--filter", f"label=guestagent.job={job_id}")
    assert listed.text().strip() == ""


def test_container_ignoring_sigterm_is_killed_at_timeout(
    tmp_path: Path, docker_engine: Any, busybox_image: str
) -> None:
    sched = make_scheduler(tmp_path / "state", docker_runners(docker_engine), kill_grace=1.0)
    cmd = "sh -c 'trap \"\" TERM; while :; do sleep 1; done'"
    job_id = submit_doc(sched, job_doc({"stubborn": task(
        cmd, Timeout=3, EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": busybox_image})}))
    assert sched.run(job_id) == "Failed"
    inst = sched.store.instance(job_id, "stubborn", 0)
    assert "timed out after 3s" in inst.message and inst.exit_code == 137


def run_one(tmp_path: Path, docker_engine: Any, make: Callable[[str], OssRegistry],
            tasks: dict[str, Any]) -> tuple[Scheduler, str, str]:
    """Run a job whose images come through registries from ``make``: the scheduler, the
    job id and how the job ended."""
    runners = docker_runners(docker_engine, make)
    sched = make_scheduler(tmp_path / "state", runners)
    job_id = submit_doc(sched, job_doc(tasks))
    try:
        return sched, job_id, sched.run(job_id)
    finally:
        runners["docker"].close()


def test_image_pulled_through_the_oss_registry(
    tmp_path: Path, s3: Any, bucket: Any, credentials: CredentialService, docker_engine: Any,
    busybox_image: str,
) -> None:
    name = bucket()
    path = f"oss://{name}/dockers/"
    make = registry_factory(s3, credentials, tmp_path / "registries")
    push_to_path(make, path, docker_engine, busybox_image, "myubuntu:latest")
    env = {"BATCH_COMPUTE_DOCKER_IMAGE": "localhost:5000/myubuntu",
           "BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH": path}
    sched, job_id, state = run_one(tmp_path, docker_engine, make,
                                   {"pulled": task("echo from-oss", EnvVars=env)})
    assert state == "Finished"
    assert (sched.jobs_dir / job_id / "pulled" / "0" / "stdout").read_text() == "from-oss\n"


def test_registry_storage_down_fails_clearly_and_is_retried(
    tmp_path: Path, s3: Any, credentials: CredentialService, docker_engine: Any,
) -> None:
    # The registry runs, but its OSS endpoint answers nothing.
    make = registry_factory(s3, credentials, tmp_path / "registries",
                             endpoint="http://127.0.0.1:9")
    env = {"BATCH_COMPUTE_DOCKER_IMAGE": "myubuntu",
           "BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH": "oss://nowhere-bucket/dockers/"}
    sched, job_id, state = run_one(tmp_path, docker_engine, make,
                                   {"nopull": task("true", MaxRetryCount=1, EnvVars=env)})
    assert state == "Failed"
    inst = sched.store.instance(job_id, "nopull", 0)
    assert inst.retries == 1
    assert "image myubuntu could not be pulled from oss://nowhere-bucket/dockers/" in inst.message


def test_dockerd_restart_mid_instance_is_retried(
    tmp_path: Path, docker_engine: Any, busybox_image: str
) -> None:
    sched = make_scheduler(tmp_path / "state", docker_runners(docker_engine))
    # dockerd's shutdown kills the first attempt (PID 1 ignores SIGTERM, killed after the
    # engine's grace); the retry runs to its end on the restarted engine.
    job_id = submit_doc(sched, job_doc({"survivor": task(
        "sleep 25", MaxRetryCount=1, EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": busybox_image})}))
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(sched.run(job_id)))
    thread.start()
    wait_for(lambda: sched.store.instance(job_id, "survivor", 0).ref, timeout=120)
    docker_engine.stop()
    docker_engine.start()
    thread.join(300)
    inst = sched.store.instance(job_id, "survivor", 0)
    assert result == ["Finished"], inst
    assert inst.retries == 1


def test_cli_submit_runs_an_image_from_an_oss_path(
    tmp_path: Path, s3: Any, bucket: Any, credentials: CredentialService, docker_engine: Any,
    busybox_image: str,
) -> None:
    # The user's path: `guestagent tasks submit --wait` in the foreground, the agent's own
    # registry factory (storage endpoint and credential listener from its config).
    import json
    import os
    import socket
    import subprocess
    import sys

    name = bucket()
    path = f"oss://{name}/dockers/"
    push_to_path(registry_factory(s3, credentials, tmp_path / "push"), path, docker_engine,
                 busybox_image, "myimage:v1")
    host, port = credentials.server.tcp_address  # type: ignore[union-attr]
    (tmp_path / "agent.toml").write_text(
        f'[tasks]\ndocker_host = "{docker_engine.host}"\n'
        f'[storage]\nendpoint = "{s3.url}"\npath_style = true\nregion = "us-east-1"\n'
        f'[credentials]\ntcp_host = "{host}"\ntcp_port = {port}\n'
        f'socket_path = "{credentials.settings.socket_path}"\n')
    env = dict(os.environ, GUESTAGENT_CONFIG=str(tmp_path / "agent.toml"),
               GUESTAGENT_DAEMON_STATE_DIR=str(tmp_path / "state"),
               GUESTAGENT_DAEMON_RUN_DIR=str(tmp_path / "run"))
    env_vars = {"BATCH_COMPUTE_DOCKER_IMAGE": "localhost:5000/myimage:v1",
                "BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH": path}
    (tmp_path / "job.json").write_text(json.dumps(job_doc(
        {"pulled": task("echo from-oss", EnvVars=env_vars)})))
    done = subprocess.run([sys.executable, "-m", "guestagent", "tasks", "submit",
                           str(tmp_path / "job.json"), "--wait"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    stdout = tmp_path / "state" / "tasks" / "jobs" / job_id / "pulled" / "0" / "stdout"
    assert stdout.read_text() == "from-oss\n"
    # The registry it started is gone with the command: nothing listens on its port.
    (config,) = (tmp_path / "state" / "tasks" / "registries").glob("*/config.yml")
    host, _, port = json.loads(config.read_text())["http"]["addr"].rpartition(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()
