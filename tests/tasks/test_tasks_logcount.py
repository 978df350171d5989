"""The guide's log-count example end to end: split -> count x3 -> merge, in host mode and
in Docker mode (image pushed to the OSS-backed registry), job.cfg and JSON forms; the
merged result in OSS is checked against a count made here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dockerjobs import docker_runners, push_to_path, registry_factory
from logcount import (
    cfg_flags,
    copy_example,
    expected_counts,
    json_job,
    log_data,
    package_tarball,
)
from tasks_helpers import make_scheduler, needs_fuse

from guestagent.tasks import jobcfg, submit

pytestmark = [pytest.mark.slow, needs_fuse]


def _bucket_with_data(bucket: Any) -> tuple[str, bytes]:
    data = log_data()
    name = bucket({"log-count/log-count-data.txt": data,
                   "log-count/worker.tar.gz": package_tarball()})
    return name, data


def _result(bucket: Any, name: str) -> dict[str, int]:
    body = bucket.client.get_object(Bucket=name, Key="log-count/merge_result.txt")["Body"]
    return dict(json.loads(body.read()))


def test_log_count_job_cfg_host_mode(tmp_path: Path, bucket: Any, storage: Any) -> None:
    name, data = _bucket_with_data(bucket)
    cfg = copy_example(tmp_path / "user")
    flags = cfg_flags(name, str(tmp_path / "home" / "input"), str(tmp_path / "home" / "output"))
    sched = make_scheduler(tmp_path / "state", storage=storage)
    job_id, _ = submit.create(sched.store, sched.jobs_dir, cfg, flags, 21600)
    assert sched.run(job_id) == "Finished", sched.store.instances(job_id)
    assert _result(bucket, name) == expected_counts(data)
    counts = [f"log-count/count_results/{i}.txt" for i in range(3)]
    keys = {o["Key"] for o in bucket.client.list_objects_v2(Bucket=name)["Contents"]}
    assert set(counts) <= keys


def test_log_count_json_host_mode_with_log_redirects(
    tmp_path: Path, bucket: Any, storage: Any
) -> None:
    name, data = _bucket_with_data(bucket)
    doc = json_job(name, str(tmp_path / "home" / "input") + "/",
                   str(tmp_path / "home" / "output") + "/")
    sched = make_scheduler(tmp_path / "state", storage=storage)
    job, doc = jobcfg.Job.parse(doc), doc
    job_id, notices = submit.create_from(sched.store, sched.jobs_dir, job, doc, 21600)
    assert notices  # AutoCluster recorded, said once
    assert sched.run(job_id) == "Finished"
    assert _result(bucket, name) == expected_counts(data)
    # stdout of every instance under the guide's names in StdoutRedirectPath.
    for task, index in (("split", 0), ("count", 0), ("count", 1), ("count", 2), ("merge", 0)):
        key = f"log-count/logs/stdout.{job_id}.{task}.{index}"
        body = bucket.client.get_object(Bucket=name, Key=key)["Body"].read().decode()
        assert body.strip(), key
    merged = bucket.client.get_object(
        Bucket=name, Key=f"log-count/logs/stdout.{job_id}.merge.0")["Body"].read()
    assert json.loads(merged) == expected_counts(data)


def test_log_count_docker_mode_through_the_oss_registry(
    tmp_path: Path, s3: Any, bucket: Any, storage: Any, credentials: Any, docker_engine: Any,
    python_image: str,
) -> None:
    name, data = _bucket_with_data(bucket)
    registry_path = f"oss://{name}/dockers/"
    make = registry_factory(s3, credentials, tmp_path / "registries")
    push_to_path(make, registry_path, docker_engine, python_image, "myubuntu:latest")
    cfg = copy_example(tmp_path / "user")
    # The guide's own command: bcs sub --file job.cfg -r ...:/home/input -w ...:/home/output
    #   --docker localhost:5000/myubuntu@oss://your-bucket/dockers/
    flags = cfg_flags(name, "/home/input", "/home/output",
                      docker=f"localhost:5000/myubuntu@{registry_path}")
    runners = docker_runners(docker_engine, make)
    sched = make_scheduler(tmp_path / "state", runners, storage=storage)
    job_id, _ = submit.create(sched.store, sched.jobs_dir, cfg, flags, 21600)
    try:
        assert sched.run(job_id) == "Finished", sched.store.instances(job_id)
    finally:
        runners["docker"].close()
    assert _result(bucket, name) == expected_counts(data)
    # Nothing was written on the host's own /home/input or /home/output.
    assert not Path("/home/output/merge_result.txt").exists()


def test_log_count_with_tasks_submit_wait(
    tmp_path: Path, s3: Any, bucket: Any, credentials: Any
) -> None:
    """The user's way: the job.cfg and bcs flags through ``guestagent tasks submit --wait``,
    storage from the agent's settings (keys from the credential server's socket)."""
    import os
    import subprocess
    import sys

    from fixtures.cloud import tcp_base

    name, data = _bucket_with_data(bucket)
    cfg = copy_example(tmp_path / "user")
    settings = credentials.settings
    port = tcp_base(credentials).rsplit(":", 1)[1]
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
        f'[credentials]\nsocket_path = "{settings.socket_path}"\ntcp_enabled = true\n'
        f"tcp_port = {port}\n"
        f'[storage]\nendpoint = "{s3.url}"\npath_style = true\nregion = "us-east-1"\n'
        "[tasks]\nmax_parallel = 3\n")
    inp, out = tmp_path / "home" / "input", tmp_path / "home" / "output"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "guestagent", "--config", str(config), "tasks", "submit",
         str(cfg), "--wait", "-r", f"oss://{name}/log-count/:{inp}",
         "-w", f"oss://{name}/log-count/:{out}", "-e", f"INPUT_DIR:{inp},OUTPUT_DIR:{out}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("job-")
    assert _result(bucket, name) == expected_counts(data)
