"""The host-wide counts of shared mounts (storage/mountrefs.py) on their own: the first user
mounts, the last unmounts; a conflicting user is refused with both named before anything
is mounted; the records hold across threads, processes and a kill -9 mid-mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from polling import wait_for

from guestagent.storage.errors import StorageError
from guestagent.storage.mountrefs import Claim, MountConflict, MountRefs, Record

SRC = "nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/share/"
RO = "vers=3,nolock,proto=tcp,hard,ro,_netdev"
RW = "vers=3,nolock,proto=tcp,hard,_netdev"


class FakeKernel:
    """What is mounted where, and every mount/unmount made (the counter under test
    decides when they happen)."""

    def __init__(self) -> None:
        self.points: set[str] = set()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def mount(self, where: str) -> str | None:
        with self.lock:
            assert where not in self.points, f"{where} mounted twice"
            self.points.add(where)
            self.calls.append(f"mount {where}")
        return None

    def unmount(self, record: Record) -> None:
        with self.lock:
            self.points.discard(record.where)
            self.calls.append(f"umount {record.where}")

    def mounted(self, where: str) -> bool:
        return where in self.points

    def acquire(self, refs: MountRefs, claim: Claim) -> bool:
        return refs.acquire(claim, lambda: self.mount(claim.where),
                            lambda: self.mounted(claim.where))


def claim(user: str, where: str = "/mnt/nas", source: str = SRC, options: str = RO) -> Claim:
    return Claim(where, source, options, user)


def test_first_user_mounts_last_user_unmounts(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    assert k.acquire(refs, claim("job-a.t.0")) is True
    assert k.acquire(refs, claim("job-a.t.1")) is False  # joins the mount
    assert k.acquire(refs, claim("job-b.u.0")) is False  # another task, same entry
    assert k.calls == ["mount /mnt/nas"]
    assert refs.release("/mnt/nas", "job-a.t.0", k.unmount) is False
    assert refs.release("/mnt/nas", "job-b.u.0", k.unmount) is False
    assert k.mounted("/mnt/nas") and refs.users("/mnt/nas") == ["job-a.t.1"]
    assert refs.release("/mnt/nas", "job-a.t.1", k.unmount) is True
    assert k.calls == ["mount /mnt/nas", "umount /mnt/nas"]
    assert refs.records() == []
    # A release nobody recorded touches nothing.
    assert refs.release("/mnt/nas", "job-a.t.1", k.unmount) is None


def test_the_same_user_counts_once(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.acquire(refs, claim("job-a.t.0"))
    k.acquire(refs, claim("job-a.t.0"))  # re-adopted: joins again
    assert refs.users("/mnt/nas") == ["job-a.t.0"]
    assert refs.release("/mnt/nas", "job-a.t.0", k.unmount) is True


@pytest.mark.parametrize(("other", "why"), [
    (claim("job-b.u.0", source="nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/other/"),
     "another source"),
    (claim("job-b.u.0", options=RW), "read-only vs writable"),
    (claim("job-b.u.0", options=RO.replace("nolock,", "")), "other mount options"),
])
def test_a_conflicting_user_is_refused_naming_both(tmp_path: Path, other: Claim,
                                                    why: str) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.acquire(refs, claim("job-a.t.0"))
    before = (tmp_path / "mounts").glob("*.json")
    texts = {p: p.read_text() for p in before}
    with pytest.raises(MountConflict) as err:
        refs.check(other, lambda: k.mounted(other.where))
    message = str(err.value)
    assert "\n" not in message
    assert "job-a.t.0" in message and "job-b.u.0" in message and why in message
    assert SRC in message and other.source in message
    with pytest.raises(MountConflict, match=why):
        k.acquire(refs, other)
    assert k.calls == ["mount /mnt/nas"]  # nothing mounted for the refused one
    assert {p: p.read_text() for p in texts} == texts  # and its record unchanged


def test_a_mount_this_agent_did_not_make_is_refused(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.points.add("/mnt/nas")  # e.g. an fstab mount of the administrator's
    with pytest.raises(MountConflict, match="did not make"):
        k.acquire(refs, claim("job-a.t.0"))
    assert refs.records() == [] and k.calls == []


def test_a_failed_first_mount_leaves_no_record(tmp_path: Path) -> None:
    refs = MountRefs(tmp_path / "mounts")

    def fail() -> str | None:
        raise StorageError("mount failed: no NFS client")

    with pytest.raises(StorageError, match="no NFS client"):
        refs.acquire(claim("job-a.t.0"), fail, lambda: False)
    assert refs.records() == []


def test_a_lost_mount_is_made_again_for_the_next_user(tmp_path: Path) -> None:
    # A reboot (the state dir persists, mounts do not) or a manual umount.
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.acquire(refs, claim("job-a.t.0"))
    k.points.clear()
    assert k.acquire(refs, claim("job-a.t.1")) is True
    assert k.calls == ["mount /mnt/nas", "mount /mnt/nas"]


def test_prune_drops_users_that_no_longer_run(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    for user in ("job-a.t.0", "job-a.t.1"):
        k.acquire(refs, claim(user))
    k.acquire(refs, claim("job-a.t.0", where="/mnt/other"))
    alive = {"job-a.t.1"}
    assert sorted(refs.prune(alive.__contains__, k.unmount)) == ["job-a.t.0", "job-a.t.0"]
    assert k.mounted("/mnt/nas") and not k.mounted("/mnt/other")
    assert refs.users("/mnt/nas") == ["job-a.t.1"]
    assert refs.prune(alive.__contains__, k.unmount) == []


def test_threads_sharing_one_mount_point_mount_and_unmount_once(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    users = [f"job-a.t.{i}" for i in range(8)]
    barrier = threading.Barrier(len(users))
    errors: list[BaseException] = []

    def one(user: str) -> None:
        try:
            k.acquire(refs, claim(user))
            barrier.wait(30)  # every one holds it at once
            assert k.mounted("/mnt/nas")
            barrier.wait(30)
            refs.release("/mnt/nas", user, k.unmount)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert k.calls == ["mount /mnt/nas", "umount /mnt/nas"]


CHILD = """
import sys, time
from pathlib import Path
from guestagent.storage.mountrefs import Claim, MountRefs

refs = MountRefs(Path(sys.argv[1]))
def mount():
    Path(sys.argv[2]).touch()  # mounting now...
    time.sleep(600)            # ...and killed before it finishes
refs.acquire(Claim("/mnt/nas", sys.argv[3], "ro", "job-a.t.0"), mount, lambda: False)
"""


def test_kill_9_mid_mount_leaves_a_record_a_restart_reconciles(tmp_path: Path) -> None:
    folder, mounting = tmp_path / "mounts", tmp_path / "mounting"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(mounting), SRC],
                             env=env)
    try:
        wait_for(mounting.exists, timeout=60)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    refs, k = MountRefs(folder), FakeKernel()
    # Its claim was recorded before the mount began; its lock died with it.
    assert refs.users("/mnt/nas") == ["job-a.t.0"]
    assert k.acquire(refs, Claim("/mnt/nas", SRC, "ro", "job-a.t.1")) is True
    # The killed attempt's instance is not Running any more: reconciled away, and the
    # mount stays for the one that is.
    assert refs.prune(lambda user: user == "job-a.t.1", k.unmount) == ["job-a.t.0"]
    assert k.mounted("/mnt/nas") and refs.users("/mnt/nas") == ["job-a.t.1"]


# -- users that live as long as a process; nested mount points; one supervisor -------------

def test_a_process_user_is_dropped_when_its_process_dies(tmp_path: Path) -> None:
    from guestagent.storage.mountrefs import process_user

    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    other = subprocess.Popen(["sleep", "600"])
    try:
        doomed = process_user("storage mount", other.pid)
        k.acquire(refs, claim(doomed))
        k.acquire(refs, claim(process_user("reader")))
        assert refs.users("/mnt/nas") == [doomed, process_user("reader")]
    finally:
        other.kill()  # SIGKILL: it never counts itself out
        other.wait()
    # The survivor is the last user: its release unmounts.
    assert refs.release("/mnt/nas", process_user("reader"), k.unmount) is True
    assert k.calls == ["mount /mnt/nas", "umount /mnt/nas"] and refs.records() == []


def test_a_dead_process_user_does_not_keep_a_conflict_alive(tmp_path: Path) -> None:
    from guestagent.storage.mountrefs import process_user

    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    other = subprocess.Popen(["sleep", "600"])
    k.acquire(refs, claim(process_user("old", other.pid)))
    other.kill()
    other.wait()
    k.points.clear()  # its mount went with it (a reboot, a manual umount)
    assert k.acquire(refs, claim("job-b.u.0", options=RW)) is True
    assert refs.users("/mnt/nas") == ["job-b.u.0"]


@pytest.mark.parametrize(("first", "second", "how"), [
    ("/mnt/data", "/mnt/data/sub/dir", "inside"),
    ("/mnt/data/sub", "/mnt/data", "around"),
])
def test_nested_mount_points_are_refused_naming_both(tmp_path: Path, first: str, second: str,
                                                     how: str) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.acquire(refs, claim("job-a.t.0", where=first))
    wanted = claim("job-b.u.0", where=second, source="oss://bucket/in/", options="ro")
    for attempt in (lambda: refs.check(wanted, lambda: k.mounted(second)),
                    lambda: k.acquire(refs, wanted)):
        with pytest.raises(MountConflict) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and f"{second} is {how} {first}" in message
        assert "job-a.t.0" in message and "job-b.u.0" in message
        assert SRC in message and "oss://bucket/in/" in message
    assert k.calls == [f"mount {first}"] and refs.users(second) == []


def test_side_by_side_mount_points_are_not_nested(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.acquire(refs, claim("job-a.t.0", where="/mnt/data"))
    k.acquire(refs, claim("job-b.u.0", where="/mnt/data2"))  # a prefix, not a parent
    k.acquire(refs, claim("job-b.u.0", where="/mnt/other"))
    assert k.calls == ["mount /mnt/data", "mount /mnt/data2", "mount /mnt/other"]


def test_a_mount_point_left_by_its_users_no_longer_blocks_a_nested_one(tmp_path: Path) -> None:
    refs, k = MountRefs(tmp_path / "mounts"), FakeKernel()
    k.acquire(refs, claim("job-a.t.0", where="/mnt/data"))
    refs.release("/mnt/data", "job-a.t.0", k.unmount)
    assert k.acquire(refs, claim("job-b.u.0", where="/mnt/data/sub")) is True


HOLDER = """
import sys, time
from pathlib import Path
from guestagent.storage.mountrefs import MountRefs

fd = MountRefs(Path(sys.argv[1])).supervise("/mnt/oss")
print("holding" if fd is not None else "refused", flush=True)
time.sleep(600)
"""


def test_one_supervisor_at_a_time_and_a_killed_one_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "mounts"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        refs = MountRefs(folder)
        assert refs.supervise("/mnt/oss") is None  # it supervises: we only report
        other = refs.supervise("/mnt/other")  # another mount point is another matter
        assert other is not None
        os.close(other)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    fd = wait_for(lambda: refs.supervise("/mnt/oss"), timeout=30)
    try:
        assert refs.supervise("/mnt/oss") is None  # never two, even in one process
    finally:
        os.close(fd)
