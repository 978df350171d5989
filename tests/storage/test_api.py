"""The facade the task launcher calls: package fetched and unpacked, outputs uploaded, a
read-only mount made and released."""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from guestagent.storage.api import Storage
from guestagent.storage.errors import BadInput
from guestagent.storage.mounts import Options, RcloneRemote, mountinfo


def tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_package_unpacks_into_the_workdir(bucket, agent_transfers, tmp_path):
    name = bucket({"test/worker.tar.gz": tarball({"test.py": b"print('hello')\n"})})
    workdir = tmp_path / "batchcompute" / "workdir"
    result = Storage(agent_transfers).fetch_package(f"oss://{name}/test/worker.tar.gz", workdir)
    assert (workdir / "test.py").read_bytes() == b"print('hello')\n"
    assert result.members == 1
    assert sorted(p.name for p in workdir.parent.iterdir()) == ["workdir"]


def test_a_package_that_escapes_changes_nothing(bucket, agent_transfers, tmp_path):
    name = bucket({"w.tar.gz": tarball({"ok.txt": b"1", "../../evil.sh": b"rm -rf /"})})
    workdir = tmp_path / "wd"
    workdir.mkdir()
    with pytest.raises(BadInput, match=re.escape("contains '..'")):
        Storage(agent_transfers).fetch_package(f"oss://{name}/w.tar.gz", workdir)
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml", "wd"]


def test_upload_dir_and_file(bucket, agent_transfers, tmp_path):
    name = bucket()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("A")
    (out / "sub" / "b.txt").write_text("B")
    storage = Storage(agent_transfers)
    assert storage.upload_dir(out, f"oss://{name}/results/") == ["results/a.txt",
                                                                 "results/sub/b.txt"]
    log = tmp_path / "task.log"
    log.write_text("done\n")
    assert str(storage.upload_file(log, f"oss://{name}/logs/")) == f"oss://{name}/logs/task.log"
    body = bucket.client.get_object(Bucket=name, Key="logs/task.log")["Body"].read()
    assert body == b"done\n"


@pytest.mark.parametrize(("call", "message"), [
    (lambda s, p: s.upload_dir(p, "oss://bkt/file"), "must be an OSS directory"),
    (lambda s, p: s.upload_dir(Path("/etc"), "oss://bkt/d/"), "system directory /etc"),
    (lambda s, p: s.fetch_package("oss://bkt/w.zip", p), ".tar.gz, .tgz or .tar"),
    (lambda s, p: s.mount("oss://bkt/d/", p, write=True), "writable OSS mounts"),
    (lambda s, p: s.mount("oss://bkt/d/", Path("/")), "may not be '/'"),
])
def test_refusals(call, message, tmp_path):
    with pytest.raises(BadInput, match=re.escape(message)):
        call(Storage(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("rclone") is None or os.geteuid() != 0, reason="rclone, root")
def test_mount_and_release(bucket, creds, s3, tmp_path):
    name = bucket({"in/data.csv": b"a,b\n"})
    remote = RcloneRemote(endpoint=s3.url, credentials_url=creds.aws_url, path_style=True,
                          region="us-east-1", token_file=creds.token_file)
    storage = Storage(remote=remote, options=Options(run_dir=tmp_path / "run", ready_timeout=60))
    dest = tmp_path / "input"
    with storage.mount(f"oss://{name}/in/", dest) as handle:
        assert (dest / "data.csv").read_bytes() == b"a,b\n"
        assert handle.healthy()
    assert mountinfo(dest) is None
    storage.close()


def test_rclone_uses_the_credential_servers_token_file():
    from guestagent.config import from_mapping
    from guestagent.storage.api import rclone_remote

    settings = from_mapping({"credentials": {"socket_path": "/run/x/credentials.sock"},
                             "storage": {"endpoint": "http://127.0.0.1:9000",
                                         "path_style": True}})
    remote = rclone_remote(settings, {})
    assert remote.token_file == settings.credentials.token_path
    port = settings.credentials.tcp_port
    assert remote.credentials_url == f"http://127.0.0.1:{port}/v1/credentials/aws"
    env = remote.env({"AWS_ACCESS_KEY_ID": "leak", "PATH": "/bin"})
    assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] == str(settings.credentials.token_path)
    assert "AWS_ACCESS_KEY_ID" not in env and env["PATH"] == "/bin"
    assert env["RCLONE_CONFIG_GAOSS_PROVIDER"] == "Other"
