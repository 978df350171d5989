"""NAS ``Mounts`` entries of a task, against a real NFS server (nfs-ganesha on loopback, the
``nas`` local-cloud component): the preflight passes and ``tasks show`` records the planned
mount; a wrong export fails the preflight, its step named; and since this machine's kernel
has no NFS client, the mount step fails with that reason — retried per MaxRetryCount,
nothing left mounted or created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tasks_helpers import job_doc, task

from guestagent.storage import nas

V3 = "vers=3,nolock,proto=tcp"
COMMON = "rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"


@pytest.fixture
def env(tmp_path: Path, ganesha: Any) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
    (tmp_path / "agent.toml").write_text("[tasks]\nmax_parallel = 2\nkill_grace = 2.0\n")
    out.update({
        "GUESTAGENT_CONFIG": str(tmp_path / "agent.toml"),
        "GUESTAGENT_DAEMON_STATE_DIR": str(tmp_path / "state"),
        "GUESTAGENT_DAEMON_RUN_DIR": str(tmp_path / "run"),
        "GUESTAGENT_STORAGE_NAS_PORT": str(ganesha.nfs_port),
        "GUESTAGENT_STORAGE_NAS_MOUNT_PORT": str(ganesha.mount_port),
    })
    return out


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guestagent", "tasks", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def run_job(tmp_path: Path, env: dict[str, str], source: str, dest: Path,
            **fields: Any) -> dict[str, Any]:
    marker = tmp_path / "ran"
    doc = job_doc({"reader": task(f"touch {marker}", MaxRetryCount=1, Mounts={
        "Entries": [{"Source": source, "Destination": f"{dest}/", **fields}]})})
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    done = cli(env, "submit", str(path), "--wait")
    job_id = done.stdout.strip().splitlines()[0]
    shown = cli(env, "show", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert not marker.exists(), "the command ran without its mount"
    return dict(json.loads(shown.stdout))


def no_mount_under(path: Path) -> bool:
    return not any(str(path) in line for line in Path("/proc/self/mountinfo").read_text()
                   .splitlines())


def test_preflight_passes_and_the_kernel_limit_is_named(
    tmp_path: Path, env: dict[str, str], ganesha: Any
) -> None:
    if nas.kernel_has_nfs():
        pytest.skip("this kernel has an NFS client: the mount would be made")
    dest = tmp_path / "data" / "nas"
    shown = run_job(tmp_path, env, ganesha.url, dest)
    assert shown["state"] == "Failed"
    (inst,) = shown["tasks"][0]["instances"]
    assert inst["state"] == "Failed" and inst["retries"] == 1  # retried per MaxRetryCount
    # Past the preflight (name, TCP, export listed): the mount step, with the reason.
    message = inst["message"]
    assert "step 'mount' failed" in message and "no NFS client" in message, message
    assert f"127.0.0.1:{ganesha.export_dir}/" in message and "\n" not in message
    # The planned mount, as tasks show records it.
    (planned,) = inst["mounts"]
    assert planned["source"] == ganesha.url
    assert planned["destination"] == f"{dest}/"
    assert planned["options"] == (f"{V3},port={ganesha.nfs_port},mountport={ganesha.mount_port},"
                                  f"{COMMON},ro,_netdev")
    # Nothing half-done: no mount, and the directories made for it are gone.
    assert not (tmp_path / "data").exists()
    assert no_mount_under(tmp_path)
    text = cli(env, "show", shown["id"]).stdout
    assert f"mount {ganesha.url} -> {dest}" in text


def test_write_support_and_lock_shape_the_options(
    tmp_path: Path, env: dict[str, str], ganesha: Any
) -> None:
    doc_dest = tmp_path / "rw"
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_doc({"writer": task("true", Mounts={
        "Lock": True,
        "Entries": [{"Source": ganesha.url, "Destination": f"{doc_dest}/",
                     "WriteSupport": True}]})})))
    done = cli(env, "submit", str(path), "--wait")
    job_id = done.stdout.strip().splitlines()[0]
    shown = json.loads(cli(env, "show", job_id, "--json").stdout)
    (planned,) = shown["tasks"][0]["instances"][0]["mounts"]
    options = planned["options"].split(",")
    assert "ro" not in options and "nolock" not in options and "vers=3" in options


def test_a_wrong_export_fails_the_preflight_with_its_step(
    tmp_path: Path, env: dict[str, str], ganesha: Any
) -> None:
    dest = tmp_path / "nas"
    shown = run_job(tmp_path, env, f"nas://127.0.0.1:{ganesha.export_dir}-missing/", dest)
    assert shown["state"] == "Failed"
    (inst,) = shown["tasks"][0]["instances"]
    assert inst["retries"] == 1
    message = inst["message"]
    assert "NAS preflight" in message and "step 'export' failed" in message, message
    assert not dest.exists() and no_mount_under(tmp_path)


def test_an_unreachable_server_fails_the_connect_step(
    tmp_path: Path, env: dict[str, str], ganesha: Any
) -> None:
    env = dict(env, GUESTAGENT_STORAGE_NAS_PORT="1")  # nothing listens there
    shown = run_job(tmp_path, env, ganesha.url, tmp_path / "nas")
    message = shown["tasks"][0]["instances"][0]["message"]
    assert "step 'connect' failed" in message, message


def test_docker_binds_a_nas_mount_read_only_unless_write_support(tmp_path: Path) -> None:
    from guestagent.tasks import staging
    from guestagent.tasks.model import Job

    doc = job_doc({"t": task("true", EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": "img:1"}, Mounts={
        "Entries": [{"Source": "nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/a/",
                     "Destination": "/mnt/ro/"},
                    {"Source": "nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/b/",
                     "Destination": "/mnt/rw/", "WriteSupport": True}]})})
    layout = staging.Layout(tmp_path / "job" / "t" / "0")
    binds = staging.binds(layout, Job.parse(doc).tasks["t"], tmp_path / "job")
    by_target = {b.target: b for b in binds}
    ro = by_target["/mnt/ro/"]
    assert ro.read_only and ro.host == str(layout.root / "nas-0")
    assert not by_target["/mnt/rw/"].read_only
