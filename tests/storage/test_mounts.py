"""Read-only OSS mounts with a real rclone against a real S3 server (moto), keys from the
agent's credential server: readable, read-only, supervised, released."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
from pathlib import Path

import pytest
from polling import wait_for

from guestagent.storage.errors import BadInput, StorageError
from guestagent.storage.mounts import Mount, MountTable, Options, RcloneRemote, mountinfo
from guestagent.storage.ossurl import OssUrl

pytestmark = pytest.mark.skipif(
    shutil.which("rclone") is None or not Path("/dev/fuse").exists() or os.geteuid() != 0,
    reason="needs rclone, /dev/fuse and root",
)


@pytest.fixture
def remote(creds, s3) -> RcloneRemote:
    return RcloneRemote(endpoint=s3.url, credentials_url=creds.aws_url, region="us-east-1",
                        path_style=True, token_file=creds.token_file)


@pytest.fixture
def table(tmp_path):
    t = MountTable()
    yield t
    t.stop_all(grace=2)


def options(tmp_path: Path) -> Options:
    return Options(run_dir=tmp_path / "run-storage", ready_timeout=60)


def test_a_mount_shows_the_objects_read_only(bucket, remote, table, tmp_path, creds):
    name = bucket({"data/in.txt": b"input data\n", "data/sub/b.bin": b"\x00\x01",
                   "other/x": b"not mounted"})
    dest = tmp_path / "mnt" / "data"
    mount = table.add(Mount(OssUrl(name, "data/"), dest, remote, options(tmp_path)))
    assert mountinfo(dest) == "fuse.rclone"
    assert (dest / "in.txt").read_bytes() == b"input data\n"
    assert sorted(os.listdir(dest)) == ["in.txt", "sub"]
    assert (dest / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(OSError) as err:
        (dest / "new.txt").write_text("no")
    assert err.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert mount.check() == "ok"
    # rclone's process carries no key: neither in argv nor in its environment.
    pid = mount.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    key = creds.service.rotator.snapshot.credentials
    assert key.access_key_secret.encode() not in cmdline + environ
    assert key.security_token.encode() not in cmdline + environ
    table.release(dest)
    assert mountinfo(dest) is None
    assert not mount.record_path.exists()


def test_a_killed_rclone_is_remounted(bucket, remote, table, tmp_path):
    name = bucket({"k.txt": b"still here"})
    dest = tmp_path / "mnt"
    mount = table.add(Mount(OssUrl(name, ""), dest, remote, options(tmp_path)))
    first = mount.proc.pid
    os.killpg(first, signal.SIGKILL)
    # The directory answers ENOTCONN (or is gone) until the supervisor remounts.
    wait_for(lambda: mount.check() != "ok", timeout=10)
    wait_for(lambda: table.check_all() or mount.health == "ok", timeout=30, step=0.2)
    assert mount.proc.pid != first and mount.remounts == 1
    assert (dest / "k.txt").read_bytes() == b"still here"


def test_a_missing_bucket_is_named_and_nothing_is_mounted(remote, table, tmp_path, s3):
    dest = tmp_path / "mnt"
    with pytest.raises(StorageError) as err:
        table.add(Mount(OssUrl("no-such-bucket-here", ""), dest, remote, options(tmp_path)))
    assert "oss://no-such-bucket-here/" in str(err.value) and "\n" not in str(err.value)
    assert " NOTICE: " not in str(err.value)  # rclone's date and level are not ours to show
    assert mountinfo(dest) is None and len(table) == 0


def test_a_non_empty_directory_is_refused(bucket, remote, table, tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(BadInput, match="directory is not empty"):
        table.add(Mount(OssUrl(bucket(), ""), dest, remote, options(tmp_path)))
    assert (dest / "mine.txt").read_text() == "keep" and mountinfo(dest) is None


def run_cli(config, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "guestagent", "--config", str(config),
                           "storage", *args], capture_output=True, text=True, timeout=120)


def test_cli_mount_mounts_umount(bucket, creds, s3, tmp_path):
    import json
    from urllib.parse import urlsplit

    name = bucket({"in/a.txt": b"from the CLI"})
    port = urlsplit(creds.aws_url).port
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[daemon]\nrun_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[credentials]\ntcp_enabled = true\ntcp_port = {port}\n'
        f'token_file = "{creds.token_file}"\n'
        f'[storage]\nendpoint = "{s3.url}"\npath_style = true\nregion = "us-east-1"\n'
        'mount_ready_timeout = 60.0\n')
    dest = tmp_path / "in"
    out = run_cli(config, "mount", f"oss://{name}/in/", str(dest))
    assert out.returncode == 0, out.stderr
    assert f"mounted oss://{name}/in/ at {dest}" in out.stdout
    try:
        assert (dest / "a.txt").read_bytes() == b"from the CLI"
        listing = run_cli(config, "mounts", "--json")
        assert listing.returncode == 0, listing.stderr
        (row,) = json.loads(listing.stdout)["mounts"]
        assert row["dest"] == str(dest) and row["health"] == "ok" and row["origin"] == "cli"
        os.killpg(row["pid"], signal.SIGKILL)
        wait_for(lambda: run_cli(config, "mounts").returncode == 1, timeout=30, step=0.5)
        table = run_cli(config, "mounts").stdout
        assert "DEST" in table and str(dest) in table
        assert "process-dead" in table or "disconnected" in table
    finally:
        done = run_cli(config, "umount", str(dest))
    assert done.returncode == 0, done.stderr
    assert mountinfo(dest) is None
    assert run_cli(config, "mounts").stdout.strip() == "no mounts"
    again = run_cli(config, "umount", str(dest))
    assert again.returncode == 1 and "not a mount made by the agent" in again.stderr


def test_cli_mount_needs_the_tcp_listener(tmp_path):
    config = tmp_path / "cli.toml"
    config.write_text(f'[daemon]\nrun_dir = "{tmp_path / "run"}"\n'
                      '[storage]\nendpoint = "http://127.0.0.1:9"\n'
                      '[credentials]\ntcp_enabled = false\n')  # on by default
    out = run_cli(config, "mount", "oss://bkt/in/", str(tmp_path / "in"))
    assert out.returncode == 3
    assert "set [credentials] tcp_enabled = true" in out.stderr
    assert not (tmp_path / "in").exists()


def test_a_hung_rclone_is_reported_then_replaced(bucket, remote, table, tmp_path):
    name = bucket({"h.txt": b"answers again"})
    dest = tmp_path / "mnt"
    opts = Options(run_dir=tmp_path / "run-storage", ready_timeout=60, stat_timeout=0.5)
    mount = table.add(Mount(OssUrl(name, ""), dest, remote, opts))
    first = mount.proc.pid
    os.killpg(first, signal.SIGSTOP)  # alive, mounted, answering nothing
    try:
        wait_for(lambda: mount.check() == "hung", timeout=20, step=0.2)
        wait_for(lambda: table.check_all() or mount.remounts == 1, timeout=60, step=0.3)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the remount, normally
            os.killpg(first, signal.SIGCONT)
    assert mount.proc.pid != first and mount.check() == "ok"
    assert (dest / "h.txt").read_bytes() == b"answers again"


AGENT = """
import sys
from pathlib import Path
from guestagent.storage.mounts import Mount, MountTable, Options, RcloneRemote
from guestagent.storage.ossurl import OssUrl
endpoint, creds_url, token_file, bucket, dest, run_dir = sys.argv[1:]
remote = RcloneRemote(endpoint=endpoint, credentials_url=creds_url, region="us-east-1",
                      path_style=True, token_file=Path(token_file))
mount = MountTable().add(Mount(OssUrl(bucket, ""), Path(dest), remote,
                               Options(run_dir=Path(run_dir), ready_timeout=60)))
print(mount.proc.pid, flush=True)
"""


def test_a_mount_outlives_the_agent_that_made_it_and_is_adopted(bucket, remote, table,
                                                                 tmp_path, creds, s3):
    import subprocess
    import sys

    name = bucket({"kept.txt": b"across a restart"})
    dest = tmp_path / "mnt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    first = subprocess.run(
        [sys.executable, "-c", AGENT, s3.url, creds.aws_url, str(creds.token_file), name,
         str(dest), str(tmp_path / "run-storage")],
        env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    pid = int(first.stdout.split()[-1])
    try:
        # That agent has exited; its mount has not.
        assert mountinfo(dest) == "fuse.rclone"
        assert (dest / "kept.txt").read_bytes() == b"across a restart"
        mount = table.add(Mount(OssUrl(name, ""), dest, remote, options(tmp_path)))
        assert mount.proc.pid == pid and mount.remounts == 0 and mount.check() == "ok"
        table.release(dest)
        assert mountinfo(dest) is None
        wait_for(lambda: not Path(f"/proc/{pid}").exists()
                 or "Z" in Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2][:3],
                 timeout=30)
    finally:
        if mountinfo(dest) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
