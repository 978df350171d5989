"""One OSS mount point shared by several processes (real rclone against moto, real
processes): the first user mounts, a user with the same source joins the same rclone, the
last release unmounts; a kill -9 of the user that made (and supervised) the mount leaves
it to the other, whose process takes over the supervision when rclone dies; another
source, or a nested mount point, is refused in one line naming both, before anything is
mounted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import gone, wait_for
from test_storage_daemon import rclone_pids

from guestagent.storage.errors import BadInput
from guestagent.storage.mountrefs import MountRefs
from guestagent.storage.mounts import Mount, MountTable, Options, RcloneRemote, mountinfo
from guestagent.storage.ossurl import OssUrl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/dev/fuse").exists() or os.geteuid() != 0
        or subprocess.run(["sh", "-c", "command -v rclone"], capture_output=True).returncode,
        reason="needs rclone, /dev/fuse and root"),
]

# One user in a process of its own: mounts (or joins) through the storage facade, as a
# task's input (so its own thread checks, and as supervisor heals, the mount), then
# obeys one command a line: "read NAME" prints the file's text, "release" counts it out.
USER = """
import sys
from pathlib import Path
from guestagent.storage.api import Storage
from guestagent.storage.mounts import MountTable, Options, RcloneRemote
endpoint, creds_url, token_file, url, dest, run_dir = sys.argv[1:]
remote = RcloneRemote(endpoint=endpoint, credentials_url=creds_url, region="us-east-1",
                      path_style=True, token_file=Path(token_file))
storage = Storage(mounts=MountTable(), remote=remote,
                  options=Options(run_dir=Path(run_dir), ready_timeout=60, check_interval=0.3))
try:
    handle = storage.mount(url, Path(dest), origin="task")
except Exception as exc:
    print("refused", exc, flush=True)
    sys.exit(3)
print("mounted", storage.mounts.mounts()[0].proc.pid, flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "read":
        try:
            print("read", Path(dest, arg).read_text().strip(), flush=True)
        except OSError as exc:
            print("error", exc.strerror, flush=True)
    elif cmd == "release":
        handle.release()
        print("released", flush=True)
        break
"""


class User:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.first = self.line()

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def read(self, name: str) -> str:
        return self.ask(f"read {name}")

    @property
    def rclone(self) -> int:
        word, _, pid = self.first.partition(" ")
        assert word == "mounted", self.first
        return int(pid)


@pytest.fixture
def users(creds: Any, s3: Any, tmp_path: Path) -> Iterator[Any]:
    """``start(url, dest)`` a user process; every one is killed at the end, and whatever
    rclone or mount a failed test left under tmp_path is ended."""
    started: list[User] = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def start(url: str, dest: Path, run_dir: Path | None = None) -> User:
        proc = subprocess.Popen(
            [sys.executable, "-c", USER, s3.url, creds.aws_url, str(creds.token_file), url,
             str(dest), str(run_dir or tmp_path / "run-storage")],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        user = User(proc)
        started.append(user)
        return user

    yield start
    for user in started:
        user.proc.kill()
        user.proc.wait(30)
    for dest in sorted({p for p in tmp_path.glob("mnt*")}, reverse=True):
        for pid in rclone_pids(dest):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in (dest / "sub", dest):
            if mountinfo(point) is not None:
                subprocess.run(["umount", "-l", str(point)], check=False)


def refs(tmp_path: Path) -> MountRefs:
    return MountRefs(tmp_path / "run-storage" / "refs")


def test_two_processes_share_one_mount_and_the_last_release_unmounts(
    bucket: Any, users: Any, tmp_path: Path
) -> None:
    name = bucket({"in/a.txt": b"shared input\n"})
    dest = tmp_path / "mnt"
    first = users(f"oss://{name}/in/", dest)
    second = users(f"oss://{name}/in/", dest)
    # One mount, one rclone: the second joined the first's.
    assert second.rclone == first.rclone and rclone_pids(dest) == {first.rclone}
    assert len(refs(tmp_path).users(str(dest))) == 2
    assert first.ask("release") == "released"
    # The first to end leaves the mount to the other.
    assert mountinfo(dest) == "fuse.rclone"
    assert second.read("a.txt") == "read shared input"
    assert second.ask("release") == "released"
    assert mountinfo(dest) is None
    wait_for(lambda: gone(first.rclone), timeout=30)
    assert refs(tmp_path).records() == []


def test_kill_9_of_the_supervising_user_leaves_the_mount_and_its_care_to_the_other(
    bucket: Any, users: Any, tmp_path: Path
) -> None:
    name = bucket({"in/a.txt": b"still readable\n"})
    dest = tmp_path / "mnt"
    maker = users(f"oss://{name}/in/", dest)
    other = users(f"oss://{name}/in/", dest)
    maker.proc.kill()  # SIGKILL: it never counts itself out; its supervision lock goes
    maker.proc.wait(30)
    assert other.read("a.txt") == "read still readable"
    assert mountinfo(dest) == "fuse.rclone" and rclone_pids(dest) == {maker.rclone}
    # rclone dies: the survivor's process now supervises it and remounts it.
    os.killpg(maker.rclone, signal.SIGKILL)
    wait_for(lambda: other.read("a.txt") == "read still readable"
             and rclone_pids(dest) - {maker.rclone}, timeout=90, step=0.3)
    (healed,) = rclone_pids(dest)
    # The killed user is no longer counted: the survivor's release is the last.
    assert other.ask("release") == "released"
    assert mountinfo(dest) is None
    wait_for(lambda: gone(healed), timeout=30)
    assert refs(tmp_path).records() == []


def test_another_source_or_a_nested_point_is_refused_naming_both(
    bucket: Any, users: Any, tmp_path: Path
) -> None:
    name = bucket({"in/a.txt": b"first\n", "other/b.txt": b"second\n"})
    dest = tmp_path / "mnt"
    first = users(f"oss://{name}/in/", dest)
    holder = refs(tmp_path).users(str(dest))[0]
    for url, where, why in ((f"oss://{name}/other/", dest, "(another source)"),
                            (f"oss://{name}/in/", dest / "sub", f"{dest / 'sub'} is inside")):
        refused = users(url, where)
        assert refused.proc.wait(60) == 3
        message = refused.first
        assert message.startswith("refused ") and why in message, message
        assert holder in message and f"oss://{name}/in/" in message and url in message
        assert f"task@pid{refused.proc.pid}." in message
    # Nothing was mounted for them; the first's mount and rclone are untouched.
    assert rclone_pids(dest) == {first.rclone} and mountinfo(dest / "sub") is None
    assert refs(tmp_path).users(str(dest)) == [holder]
    assert first.read("a.txt") == "read first"


def test_users_in_one_process_share_its_mount(bucket: Any, creds: Any, s3: Any,
                                              tmp_path: Path) -> None:
    name = bucket({"in/a.txt": b"one process\n"})
    dest = tmp_path / "mnt"
    remote = RcloneRemote(endpoint=s3.url, credentials_url=creds.aws_url, region="us-east-1",
                          path_style=True, token_file=creds.token_file)
    opts = Options(run_dir=tmp_path / "run-storage", ready_timeout=60)
    table = MountTable()
    try:
        one = table.add(Mount(OssUrl(name, "in/"), dest, remote, opts), "job-a.t.inputs")
        two = table.add(Mount(OssUrl(name, "in/"), dest, remote, opts), "settings")
        assert two is one and len(table) == 1
        with pytest.raises(BadInput) as err:
            table.add(Mount(OssUrl(name, "other/"), dest, remote, opts), "cli")
        assert "job-a.t.inputs, settings" in str(err.value) and "cli wants" in str(err.value)
        table.release(dest, user="job-a.t.inputs")
        assert (dest / "a.txt").read_text() == "one process\n"
        table.release(dest, user="settings")
        assert mountinfo(dest) is None and len(table) == 0
    finally:
        table.stop_all(grace=2)


def test_a_mount_the_agent_did_not_make_is_refused_and_left_alone(
    bucket: Any, creds: Any, s3: Any, tmp_path: Path
) -> None:
    dest = tmp_path / "mnt"
    dest.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "admin", str(dest)],
                          capture_output=True).returncode == 0
    try:
        (dest / "theirs.txt").write_text("the administrator's\n")
        remote = RcloneRemote(endpoint=s3.url, credentials_url=creds.aws_url,
                              region="us-east-1", path_style=True, token_file=creds.token_file)
        table = MountTable()
        with pytest.raises(BadInput) as err:
            table.add(Mount(OssUrl(bucket(), ""), dest, remote,
                            Options(run_dir=tmp_path / "run-storage", ready_timeout=60)), "cli")
        assert "\n" not in str(err.value) and "a mount this agent did not make" in str(err.value)
        assert "cli wants" in str(err.value) and len(table) == 0
        assert mountinfo(dest) == "tmpfs" and (dest / "theirs.txt").exists()
        assert refs(tmp_path).records() == []
    finally:
        subprocess.run(["umount", "-l", str(dest)], check=False)


def test_storage_umount_leaves_a_directory_another_user_reads(
    bucket: Any, creds: Any, s3: Any, tmp_path: Path, users: Any
) -> None:
    from urllib.parse import urlsplit

    from test_mounts import run_cli

    name = bucket({"in/a.txt": b"from the CLI\n"})
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[daemon]\nrun_dir = "{tmp_path}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[credentials]\ntcp_enabled = true\ntcp_port = {urlsplit(creds.aws_url).port}\n'
        f'token_file = "{creds.token_file}"\n'
        f'[storage]\nendpoint = "{s3.url}"\npath_style = true\nregion = "us-east-1"\n'
        'mount_ready_timeout = 60.0\n')
    dest = tmp_path / "mnt"
    made = run_cli(config, "mount", f"oss://{name}/in/", str(dest))
    assert made.returncode == 0, made.stderr
    # The CLI's run dir is <[daemon] run_dir>/storage: the same counts as the reader's.
    reader = users(f"oss://{name}/in/", dest, run_dir=tmp_path / "storage")
    assert rclone_pids(dest) == {reader.rclone}  # it joined the CLI's mount
    listed = run_cli(config, "mounts").stdout
    assert "cli," in listed and "task@pid" in listed, listed
    done = run_cli(config, "umount", str(dest))
    assert done.returncode == 0 and "left mounted for its other users" in done.stdout
    assert reader.read("a.txt") == "read from the CLI"
    assert reader.ask("release") == "released"  # now the last user
    assert mountinfo(dest) is None
