"""NAS mounts shared by parallel host instances, through the real launcher and storage
facade: the preflight reaches a real export (nfs-ganesha on loopback), the mount command
is the plan's own, and the last user (not the first) unmounts — across an agent restart
in the middle.

This kernel has no NFS client, so the last step is stood in for: a ``mount`` on PATH
records the command the agent runs (``mount -t nfs -o … host:/path DEST``) and bind-mounts
the export's directory at DEST instead, a real mount the instances read through and
``/proc/self/mountinfo`` shows; unmounting is the real ``umount``."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import job_doc, make_scheduler, submit_doc, task

from guestagent.storage import nas
from guestagent.tasks.scheduler import Scheduler

pytestmark = pytest.mark.skipif(
    shutil.which("ganesha.nfsd") is None or shutil.which("nfs-ls") is None
    or shutil.which("mount") is None,
    reason="needs nfs-ganesha, libnfs-utils and mount")

FAKE_MOUNT = """#!/bin/sh
# The agent runs: mount -t nfs -o OPTIONS HOST:/PATH DEST
echo "$*" >> {log}
[ "$1" = -t ] && [ "$2" = nfs ] || exec {real} "$@"
path=${{5#*:}}
{real} --bind "$path" "$6" || exit 32
case ",$4," in *,ro,*) {real} -o remount,bind,ro "$6" || exit 32 ;; esac
"""


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The NFS client stand-in; the log of mount commands run. Whatever is left mounted
    under tmp_path is unmounted at the end."""
    if nas.kernel_has_nfs():
        pytest.skip("this kernel has an NFS client: the stand-in is not needed")
    real = shutil.which("mount")
    bindir, log = tmp_path / "bin", tmp_path / "mount.log"
    bindir.mkdir()
    (bindir / "mount").write_text(FAKE_MOUNT.format(log=log, real=real))
    (bindir / "mount.nfs").write_text("#!/bin/sh\nexit 32\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    log.touch()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(nas, "kernel_has_nfs", lambda: True)
    try:
        yield log
    finally:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        for point in reversed([ln.split()[4] for ln in lines if str(tmp_path) in ln.split()[4]]):
            subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def facade(ganesha: Any) -> Any:
    from guestagent.storage.api import NasOptions, Storage

    return Storage(nas_options=NasOptions(port=ganesha.nfs_port,
                                          mount_port=ganesha.mount_port))


def mount_commands(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("-t nfs")]


def reader(dest: Path, out: Path, gates: Path, **fields: Any) -> dict[str, Any]:
    """An instance that reads the NAS, waits for its gate, and reads it again."""
    i = "$BATCH_COMPUTE_DAG_INSTANCE_ID"
    cmd = (f"sh -c 'cat {dest}/hello.txt > {out}/before.{i} && "
           f"while [ ! -e {gates}/{i} ]; do sleep 0.05; done && "
           f"cat {dest}/hello.txt > {out}/after.{i}'")
    return task(cmd, MaxRetryCount=0, Mounts={
        "Entries": [{"Source": None, "Destination": f"{dest}/"}]}, **fields)


def with_source(doc: dict[str, Any], source: str) -> dict[str, Any]:
    for t in doc["DAG"]["Tasks"].values():
        for e in t.get("Mounts", {}).get("Entries", []):
            e["Source"] = e["Source"] or source
    return doc


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """The NAS mount point, the instances' output and their gates. Every gate is opened at
    the end, so the instances of a failed test do not wait on after it."""
    dest, out, gates = tmp_path / "data" / "nas", tmp_path / "out", tmp_path / "gates"
    out.mkdir()
    gates.mkdir()
    yield dest, out, gates
    for i in range(2):
        (gates / str(i)).touch()


def start_two_readers(sched: Scheduler, dirs: tuple[Path, Path, Path],
                      source: str) -> tuple[str, threading.Thread, list[str]]:
    """A job of two parallel readers of one NAS entry, run until both read it once."""
    dest, out, gates = dirs
    job_id = submit_doc(sched, with_source(
        job_doc({"t": reader(dest, out, gates, InstanceCount=2)}), source))
    thread, result = run_in_thread(sched, job_id)
    # Written, not only created: the shell makes the file before cat writes into it.
    wait_for(lambda: all(_text(out / f"before.{i}") for i in (0, 1)), timeout=120)
    return job_id, thread, result


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def run_in_thread(sched: Scheduler, job_id: str) -> tuple[threading.Thread, list[str]]:
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(sched.run(job_id)), daemon=True)
    thread.start()
    return thread, result


def state(sched: Scheduler, job_id: str, name: str, index: int) -> str:
    return sched.store.instance(job_id, name, index).state


def test_the_first_instance_to_end_leaves_the_mount_to_the_other(
    tmp_path: Path, ganesha: Any, standin: Path, facade: Any,
    dirs: tuple[Path, Path, Path],
) -> None:
    dest, out, gates = dirs
    sched = make_scheduler(tmp_path / "state", storage=facade, max_parallel=2)
    job_id, thread, result = start_two_readers(sched, dirs, ganesha.url)
    # One mount for both, with the plan's command line; both read the export through it.
    (command,) = mount_commands(standin)
    assert command.startswith(f"-t nfs -o vers=3,nolock,proto=tcp,port={ganesha.nfs_port},")
    assert command.endswith(f",ro 127.0.0.1:{ganesha.export_dir}/ {dest}")
    assert (out / "before.1").read_text() == "hello from NAS\n"
    users = sorted(sched.mount_refs.users(str(dest)))
    assert users == [f"{job_id}.t.0", f"{job_id}.t.1"]

    (gates / "0").touch()
    wait_for(lambda: state(sched, job_id, "t", 0) == "Finished", timeout=60)
    assert nas.mounted(dest), "the first instance to end unmounted the share of the other"
    assert sched.mount_refs.users(str(dest)) == [f"{job_id}.t.1"]

    (gates / "1").touch()
    thread.join(120)
    assert result == ["Finished"]
    assert (out / "after.1").read_text() == "hello from NAS\n"  # read after 0 had ended
    assert not nas.mounted(dest) and not (tmp_path / "data").exists()
    assert sched.mount_refs.records() == [] and len(mount_commands(standin)) == 1


def test_a_restart_in_the_middle_keeps_the_count(
    tmp_path: Path, ganesha: Any, standin: Path, facade: Any,
    dirs: tuple[Path, Path, Path],
) -> None:
    # Two instances share the mount; the agent goes away (as a restart does: the
    # instances run on); instance 0 ends while no agent watches; the next agent adopts
    # both: 0 ended, counted out — the mount stays for 1 — and 1's end unmounts.
    dest, out, gates = dirs
    first = make_scheduler(tmp_path / "state", storage=facade, max_parallel=2)
    job_id, thread, result = start_two_readers(first, dirs, ganesha.url)
    first.detach()
    thread.join(60)
    # Its instance threads notice the detach within a poll; none may outlive it to race
    # the next agent (as a restarted process's cannot).
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("task-t-")],
             timeout=60)
    assert result == ["Running"] and nas.mounted(dest)

    (gates / "0").touch()
    wait_for(lambda: (out / "after.0").exists(), timeout=60)  # ended, agent down

    again = make_scheduler(tmp_path / "state", storage=facade, max_parallel=2)
    thread, result = run_in_thread(again, job_id)
    wait_for(lambda: state(again, job_id, "t", 0) == "Finished", timeout=60)
    assert nas.mounted(dest)
    assert again.mount_refs.users(str(dest)) == [f"{job_id}.t.1"]
    (gates / "1").touch()
    thread.join(120)
    assert result == ["Finished"]
    assert (out / "after.1").read_text() == "hello from NAS\n"
    assert not nas.mounted(dest) and again.mount_refs.records() == []
    assert len(mount_commands(standin)) == 1  # never remounted across the restart


def test_a_conflicting_entry_is_refused_and_the_share_is_untouched(
    tmp_path: Path, ganesha: Any, standin: Path, facade: Any,
    dirs: tuple[Path, Path, Path],
) -> None:
    # Two tasks of one job run in parallel with the same Destination: "reader" read-only,
    # "writer" with WriteSupport. The second to mount is refused naming both; nothing is
    # mounted for it, and the first keeps its mount.
    dest, out, gates = dirs
    sched = make_scheduler(tmp_path / "state", storage=facade, max_parallel=2)
    writer = task("true", Mounts={"Entries": [{"Source": ganesha.url,
                                               "Destination": f"{dest}/",
                                               "WriteSupport": True}]})
    job_id = submit_doc(sched, with_source(
        job_doc({"reader": reader(dest, out, gates)}, JobFailOnInstanceFail=False),
        ganesha.url))
    thread, result = run_in_thread(sched, job_id)
    wait_for(lambda: (out / "before.0").exists(), timeout=120)
    other = submit_doc(sched, job_doc({"writer": writer}))
    assert sched.run(other) == "Failed"
    inst = sched.store.instance(other, "writer", 0)
    message = inst.message
    assert "\n" not in message and "read-only vs writable" in message, message
    assert f"{job_id}.reader.0" in message and f"{other}.writer.0" in message
    assert len(mount_commands(standin)) == 1 and nas.mounted(dest)
    (gates / "0").touch()
    thread.join(120)
    assert result == ["Finished"] and not nas.mounted(dest)
