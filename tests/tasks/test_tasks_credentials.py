"""Task-scoped credentials: each instance its own consumers, usable from the host and
from a non-privileged container on the bridge (through the relay), revoked at the end."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tasks_helpers import job_doc, make_scheduler, submit_doc, task

from guestagent.credentials.service import CredentialService
from guestagent.tasks.credentials import TASK_ADDRESS, Relay, TaskCredentials

FETCH = ("python3 -c \"import json, os, urllib.request as u; "
         "ali = u.urlopen(os.environ['ALIBABA_CLOUD_CREDENTIALS_URI']).read(); "
         "aws = u.urlopen(u.Request(os.environ['AWS_CONTAINER_CREDENTIALS_FULL_URI'], "
         "headers={'Authorization': os.environ['AWS_CONTAINER_AUTHORIZATION_TOKEN']})).read(); "
         "env = {k: v for k, v in os.environ.items() if 'CREDENTIALS' in k or 'TOKEN' in k}; "
         "open('out.json', 'w').write(json.dumps([json.loads(ali), json.loads(aws), env]))\"")


def _task_names(service: CredentialService) -> list[str]:
    return [n for n in service.registry.names() if n.startswith("task:")]


@pytest.fixture
def host_minter(credentials: CredentialService) -> Iterator[TaskCredentials]:
    """Task credentials for host instances, through a relay on loopback."""
    assert credentials.settings.socket_path is not None
    relay = Relay(credentials.settings.socket_path, "127.0.0.1").start()
    minter = TaskCredentials(credentials, relay)
    try:
        yield minter
    finally:
        minter.close()


def test_host_instances_get_their_own_endpoint_revoked_at_the_end(
    tmp_path: Path, credentials: CredentialService, host_minter: TaskCredentials
) -> None:
    sched = make_scheduler(tmp_path / "state", minter=host_minter)
    job_id = submit_doc(sched, job_doc({"fetch": task(FETCH, InstanceCount=2)}))
    assert sched.run(job_id) == "Finished", sched.store.instances(job_id)
    current = credentials.rotator.snapshot.credentials
    assert current is not None
    envs = []
    for i in range(2):
        ali, aws, env = json.loads(
            (sched.jobs_dir / job_id / "fetch" / str(i) / "workdir" / "out.json").read_text())
        assert ali["Code"] == "Success" and ali["AccessKeyId"] == current.access_key_id
        assert aws["AccessKeyId"] == current.access_key_id and aws["Token"]
        envs.append(env)
    # Each instance had its own secrets ...
    tokens = {e["AWS_CONTAINER_AUTHORIZATION_TOKEN"] for e in envs}
    assert len(tokens) == 2
    assert envs[0]["ALIBABA_CLOUD_CREDENTIALS_URI"] != envs[1]["ALIBABA_CLOUD_CREDENTIALS_URI"]
    # ... none of which is in the job's state or logs ...
    token = envs[0]["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
    assert token not in (tmp_path / "state" / "tasks.db").read_bytes().decode(errors="replace")
    # ... and which no longer open anything.
    assert _task_names(credentials) == []
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(envs[0]["ALIBABA_CLOUD_CREDENTIALS_URI"])
    assert info.value.code == 403


def test_one_instance_token_never_reads_another_endpoint(
    credentials: CredentialService, host_minter: TaskCredentials
) -> None:
    relay = host_minter.relay("host")
    assert relay is not None
    env_a, revoke_a = host_minter("job.a.0", False)
    env_b, revoke_b = host_minter("job.b.0", False)
    # B's URL with A's token: refused by the server.
    req = urllib.request.Request(env_b["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={
        "Authorization": env_a["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 401
    # The host endpoint (no task path) is not reachable through the relay.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(relay.base + "/v1/credentials/alibaba")
    assert info.value.code == 403
    revoke_a()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(env_a["ALIBABA_CLOUD_CREDENTIALS_URI"])
    assert info.value.code == 403
    # B still works, with or without its header.
    body = urllib.request.urlopen(env_b["ALIBABA_CLOUD_CREDENTIALS_URI"]).read()
    assert json.loads(body)["Code"] == "Success"
    revoke_b()
    assert _task_names(credentials) == []


WGET = ("sh -c 'cd /batchcompute/workdir; "
        "wget -qO ali.json \"$ALIBABA_CLOUD_CREDENTIALS_URI\"; "
        "wget -qO aws.json --header \"Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN\" "
        "\"$AWS_CONTAINER_CREDENTIALS_FULL_URI\"; "
        "p=${AWS_CONTAINER_CREDENTIALS_FULL_URI#http://169.254.170.2:}; p=${p%%/*}; "
        "wget -qO host.json http://169.254.170.2:$p/v1/credentials/alibaba "
        "|| echo refused > host.txt'")


@pytest.mark.slow
def test_container_on_the_bridge_reads_only_its_own_endpoint(
    tmp_path: Path, credentials: CredentialService, docker_engine: Any, busybox_image: str,
) -> None:
    from dockerjobs import docker_runners

    assert credentials.settings.socket_path is not None
    relay = Relay(credentials.settings.socket_path, TASK_ADDRESS, docker_engine.bridge).start()
    try:
        minter = TaskCredentials(credentials, None, relay)
        sched = make_scheduler(tmp_path / "state", docker_runners(docker_engine), minter=minter)
        job_id = submit_doc(sched, job_doc({"inside": task(
            WGET, EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": busybox_image})}))
        assert sched.run(job_id) == "Finished", sched.store.instances(job_id)
    finally:
        relay.stop()
    work = sched.jobs_dir / job_id / "inside" / "0" / "workdir"
    current = credentials.rotator.snapshot.credentials
    assert current is not None
    assert json.loads((work / "ali.json").read_text())["AccessKeyId"] == current.access_key_id
    assert json.loads((work / "aws.json").read_text())["AccessKeyId"] == current.access_key_id
    # The host endpoint (no task path) is not reachable from the container.
    assert (work / "host.txt").read_text().strip() == "refused"
    assert _task_names(credentials) == []
