"""Task-scoped credentials: each instance its own consumers, usable from the host and
from a non-privileged container on the bridge (through the relay), revoked at the end."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import tcp_base
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


def test_host_instances_get_their_own_endpoint_revoked_at_the_end(
    tmp_path: Path, credentials: CredentialService
) -> None:
    minter = TaskCredentials(credentials.registry, credentials.rotator, tcp_base(credentials))
    sched = make_scheduler(tmp_path / "state", minter=minter)
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
    assert info.value.code in (401, 403, 404)


WGET = ("sh -c 'cd /batchcompute/workdir; "
        "wget -qO ali.json \"$ALIBABA_CLOUD_CREDENTIALS_URI\"; "
        "wget -qO aws.json --header \"Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN\" "
        "\"$AWS_CONTAINER_CREDENTIALS_FULL_URI\"; "
        "wget -qO host.json \"${AWS_CONTAINER_CREDENTIALS_FULL_URI}\" || echo refused > host.txt'")


@pytest.mark.slow
def test_container_on_the_bridge_reads_only_its_own_endpoint(
    tmp_path: Path, credentials: CredentialService, docker_engine: Any, busybox_image: str,
) -> None:
    from test_tasks_docker import _runners

    assert credentials.settings.socket_path is not None
    relay = Relay(credentials.settings.socket_path, TASK_ADDRESS, docker_engine.bridge).start()
    try:
        minter = TaskCredentials(credentials.registry, credentials.rotator,
                                 tcp_base(credentials), relay)
        sched = make_scheduler(tmp_path / "state", _runners(docker_engine), minter=minter)
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
    # Without its token the same URL reads nothing (the relay passes no other request).
    assert (work / "host.txt").read_text().strip() == "refused"
    assert _task_names(credentials) == []
