"""OSS read-only mounts of a task (InputMapping and ``Mounts`` entries with an ``oss://``
source), with real rclone mounts of a moto bucket: an OSS ``Mounts`` entry is mounted
(it was silently ignored), and an agent restart leaves a task's input mount to the
instance still reading it — the next agent adopts the same rclone instead of unmounting
under the instance and mounting again."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import job_doc, make_scheduler, needs_fuse, submit_doc, task

from guestagent.storage.mounts import mountinfo

pytestmark = [pytest.mark.slow, needs_fuse]


def gated_reader(path: str, out: Path, gate: Path, **fields: Any) -> dict[str, Any]:
    cmd = (f"sh -c 'cat {path} > {out}/before && while [ ! -e {gate} ]; do sleep 0.05; "
           f"done && cat {path} > {out}/after'")
    return task(cmd, **fields)


def fresh_facade(storage: Any) -> Any:
    """What a restarted agent builds: the same settings, a mount table of its own."""
    from guestagent.storage.api import Storage
    from guestagent.storage.mounts import MountTable

    return Storage(storage.transfers, mounts=MountTable(), remote=storage.remote,
                   options=storage.options)


def test_an_oss_mounts_entry_is_mounted_read_only(tmp_path: Path, bucket: Any,
                                                  storage: Any) -> None:
    name = bucket({"shared/hello.txt": b"hello from OSS\n"})
    dest, out = tmp_path / "oss", tmp_path / "out"
    out.mkdir()
    sched = make_scheduler(tmp_path / "state", storage=storage)
    job_id = submit_doc(sched, job_doc({"t": task(
        f"sh -c 'cat {dest}/hello.txt > {out}/read; touch {dest}/new 2> {out}/write; exit 0'",
        Mounts={"Entries": [{"Source": f"oss://{name}/shared/",
                             "Destination": f"{dest}/"}]})}))
    assert sched.run(job_id) == "Finished", sched.store.instance(job_id, "t", 0).message
    assert (out / "read").read_text() == "hello from OSS\n"
    assert "Read-only file system" in (out / "write").read_text()
    assert mountinfo(dest) is None  # released with the task


def test_docker_binds_an_oss_mounts_entry_read_only(tmp_path: Path) -> None:
    from guestagent.tasks import staging
    from guestagent.tasks.model import Job

    doc = job_doc({"t": task("true", EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": "img:1"},
                             Mounts={"Entries": [{"Source": "oss://bucket/shared/",
                                                  "Destination": "/mnt/oss/"}]})})
    layout = staging.Layout(tmp_path / "job" / "t" / "0")
    binds = staging.binds(layout, Job.parse(doc).tasks["t"], tmp_path / "job")
    (bind,) = [b for b in binds if b.target == "/mnt/oss/"]
    assert bind.read_only and bind.host == str(tmp_path / "job" / "t" / "mount-0")


def test_a_restart_leaves_the_input_mount_to_the_running_instance(
    tmp_path: Path, bucket: Any, storage: Any
) -> None:
    name = bucket({"in/data.txt": b"input data\n"})
    local, out, gate = tmp_path / "input", tmp_path / "out", tmp_path / "gate"
    out.mkdir()
    first = make_scheduler(tmp_path / "state", storage=storage)
    job_id = submit_doc(first, job_doc({"t": gated_reader(
        f"{local}/data.txt", out, gate, InputMapping={f"oss://{name}/in/": f"{local}/"})}))
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(first.run(job_id)), daemon=True)
    thread.start()
    wait_for((out / "before").exists, timeout=120)
    (mount,) = storage.mounts.mounts()
    pid = mount.proc.pid
    first.detach()
    thread.join(60)
    assert result == ["Running"]
    assert mountinfo(local) is not None, "the restart unmounted the input under its instance"

    again = make_scheduler(tmp_path / "state", storage=fresh_facade(storage))
    thread = threading.Thread(target=lambda: result.append(again.run(job_id)), daemon=True)
    thread.start()
    wait_for(lambda: len(again.storage(True).mounts) == 1, timeout=60)  # type: ignore[union-attr]
    (adopted,) = again.storage(True).mounts.mounts()  # type: ignore[union-attr]
    assert adopted.proc.pid == pid  # the same rclone, not a new mount
    gate.touch()
    thread.join(120)
    assert result == ["Running", "Finished"]
    assert (out / "after").read_text() == "input data\n"
    assert mountinfo(local) is None  # released when its task ended


def test_two_jobs_share_an_input_dir_and_the_first_to_end_leaves_it(
    tmp_path: Path, bucket: Any, storage: Any
) -> None:
    name = bucket({"in/data.txt": b"shared input\n"})
    local = tmp_path / "input"
    sched = make_scheduler(tmp_path / "state", storage=storage, max_parallel=2)
    outs, gates = [tmp_path / "out-a", tmp_path / "out-b"], [tmp_path / "ga", tmp_path / "gb"]
    jobs, results = [], []
    for out, gate in zip(outs, gates, strict=True):
        out.mkdir()
        jobs.append(submit_doc(sched, job_doc({"t": gated_reader(
            f"{local}/data.txt", out, gate, InputMapping={f"oss://{name}/in/": f"{local}/"})})))
    threads = []
    for job_id in jobs:
        done: list[str] = []
        results.append(done)
        threads.append(threading.Thread(target=lambda j=job_id, d=done: d.append(sched.run(j)),
                                        daemon=True))
        threads[-1].start()
    try:
        wait_for(lambda: all((o / "before").exists() for o in outs), timeout=120)
        assert len(storage.mounts.mounts()) == 1  # one mount, both jobs counted in
        assert sorted(storage.refs.users(str(local))) == sorted(f"{j}.t.inputs" for j in jobs)
        gates[0].touch()
        threads[0].join(120)
        assert results[0] == ["Finished"]
        assert mountinfo(local) is not None, "the first job's end unmounted the other's input"
    finally:
        for gate in gates:
            gate.touch()
    threads[1].join(120)
    assert results[1] == ["Finished"]
    assert (outs[1] / "after").read_text() == "shared input\n"
    assert mountinfo(local) is None and storage.refs.records() == []


def test_a_nas_entry_inside_another_tasks_oss_input_is_refused(
    tmp_path: Path, bucket: Any, storage: Any
) -> None:
    name = bucket({"in/data.txt": b"input\n"})
    local, out, gate = tmp_path / "input", tmp_path / "out", tmp_path / "gate"
    out.mkdir()
    sched = make_scheduler(tmp_path / "state", storage=storage, max_parallel=2)
    reader = submit_doc(sched, job_doc({"t": gated_reader(
        f"{local}/data.txt", out, gate, InputMapping={f"oss://{name}/in/": f"{local}/"})}))
    thread = threading.Thread(target=sched.run, args=(reader,), daemon=True)
    thread.start()
    try:
        wait_for((out / "before").exists, timeout=120)
        nas = "nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/share/"
        nested = submit_doc(sched, job_doc({"n": task("true", Mounts={"Entries": [
            {"Source": nas, "Destination": f"{local}/nas/"}]})}))
        assert sched.run(nested) == "Failed"
        message = sched.store.instance(nested, "n", 0).message
        assert "\n" not in message and f"{local}/nas is inside {local}" in message, message
        assert f"{reader}.t.inputs" in message and f"{nested}.n.0" in message
        assert mountinfo(local) is not None and not (local / "nas").exists()
    finally:
        gate.touch()
    thread.join(120)
    assert (out / "after").read_text() == "input\n"
