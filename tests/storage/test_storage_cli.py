"""``guestagent storage cp|ls|sync|rm`` as a user runs them: keys from the agent's
credential socket, the local cloud's S3 stand-in as the endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import boto, random_file

from guestagent.storage.settings import MiB


class Cli:
    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, GUESTAGENT_CONFIG=str(self.config))
        return subprocess.run([sys.executable, "-m", "guestagent", *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, creds: Any, endpoint: str, state: Path, **storage: Any) -> Path:
    cs = creds.service.settings
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in storage.items())
    path.write_text(
        "[metadata]\n"
        f'url = "{creds.service.client.settings.url}"\n'
        "[credentials]\n"
        f'socket_path = "{cs.socket_path}"\n'
        f'token_file = "{creds.token_file}"\n'
        "[storage]\n"
        f'endpoint = "{endpoint}"\n'
        "path_style = true\n"
        f'state_dir = "{state}"\n' + extra
    )
    return path


@pytest.fixture
def cli(creds: Any, s3: Any, tmp_path: Path) -> Cli:
    boto(s3.url).create_bucket(Bucket="bkt")
    return Cli(write_config(tmp_path / "agent.toml", creds, s3.url, tmp_path / "state",
                            multipart_threshold=6 * MiB, part_size=5 * MiB))


def test_cp_up_ls_and_down(cli: Cli, tmp_path: Path, s3: Any, creds: Any) -> None:
    src = random_file(tmp_path / "data" / "big.bin", 7 * MiB)
    random_file(tmp_path / "data" / "sub" / "small.txt", 20)
    done = cli("storage", "cp", "-r", str(tmp_path / "data"), "oss://bkt/run1/", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["files"] == 2
    assert lines[-1]["bytes"] == lines[-1]["total_bytes"] == 7 * MiB + 20

    listed = cli("storage", "ls", "oss://bkt/run1/")
    assert listed.returncode == 0, listed.stderr
    assert "oss://bkt/run1/big.bin" in listed.stdout and "oss://bkt/run1/sub/" in listed.stdout
    deep = cli("storage", "ls", "-r", "--json", "oss://bkt/run1/")
    urls = sorted(json.loads(line)["url"] for line in deep.stdout.splitlines())
    assert urls == ["oss://bkt/run1/big.bin", "oss://bkt/run1/sub/small.txt"]

    out = tmp_path / "out"
    got = cli("storage", "cp", "oss://bkt/run1/big.bin", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == src.read_bytes()
    # Every request was signed with the role's keys served by the agent's socket.
    served = creds.service.rotator.snapshot.credentials.access_key_id
    assert {key for key, _ in s3.signed_with()} >= {served}


def test_sync_twice_copies_nothing_the_second_time(cli: Cli, tmp_path: Path) -> None:
    random_file(tmp_path / "data" / "a", 100)
    random_file(tmp_path / "data" / "b", 200)
    first = cli("storage", "sync", str(tmp_path / "data"), "oss://bkt/s/", "--json")
    assert json.loads(first.stdout.splitlines()[-1])["copied"] == 2, first.stderr
    second = cli("storage", "sync", str(tmp_path / "data"), "oss://bkt/s/", "--json")
    summary = json.loads(second.stdout.splitlines()[-1])
    assert (summary["copied"], summary["skipped"]) == (0, 2)
    dry = cli("storage", "sync", "--dry-run", "oss://bkt/s/", str(tmp_path / "back"))
    assert dry.stdout.split() == ["copy", "a", "copy", "b"] and not (tmp_path / "back").exists()


def test_rm_dry_run_then_for_real(cli: Cli, tmp_path: Path, s3: Any) -> None:
    random_file(tmp_path / "data" / "a", 10)
    assert cli("storage", "cp", "-r", str(tmp_path / "data"), "oss://bkt/x/").returncode == 0
    dry = cli("storage", "rm", "-r", "--dry-run", "oss://bkt/x/")
    assert dry.stdout.strip() == "would delete oss://bkt/x/a"
    assert boto(s3.url).list_objects_v2(Bucket="bkt")["KeyCount"] == 1
    assert cli("storage", "rm", "-r", "oss://bkt/x/").returncode == 0
    assert boto(s3.url).list_objects_v2(Bucket="bkt")["KeyCount"] == 0


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["storage", "cp", "oss://bkt/../x", "/tmp/x"], 2, "'..' segment"),
        (["storage", "cp", "oss://Bad_Bucket/x", "/tmp/x"], 2, "bad bucket name"),
        (["storage", "cp", "/etc/hostname", "/tmp/x"], 2, "one side must be oss://"),
        (["storage", "cp", "oss://bkt/missing", "OUT"], 1, "no such object"),
        (["storage", "ls", "oss://no-such-bucket/"], 1, "no such bucket"),
        (["storage", "rm", "oss://bkt/missing"], 1, "no such object"),
    ],
)
def test_errors_are_one_line(cli: Cli, tmp_path: Path, argv: list[str], code: int,
                             needle: str) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    res = cli(*argv)
    assert res.returncode == code, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_hostile_keys_in_a_listing_are_refused_and_shown_escaped(cli: Cli, tmp_path: Path,
                                                                  s3: Any) -> None:
    """Keys the server lists (another writer's) with '..' or a terminal escape: the copy
    is refused before any byte moves, and the message cannot move the terminal's cursor."""
    admin = boto(s3.url)
    admin.put_object(Bucket="bkt", Key="in/ok.txt", Body=b"x")
    admin.put_object(Bucket="bkt", Key="in/../../escaped.txt", Body=b"x")
    admin.put_object(Bucket="bkt", Key="esc/a\x1b[2Jb", Body=b"x")
    out = tmp_path / "out"
    res = cli("storage", "cp", "-r", "oss://bkt/in/", str(out / "in"))
    assert res.returncode == 2 and "'..' segment" in res.stderr, res.stderr
    res = cli("storage", "cp", "-r", "oss://bkt/esc/", str(out / "esc"))
    assert res.returncode == 2 and "control character" in res.stderr, res.stderr
    assert "\x1b" not in res.stderr and "a\\x1b[2Jb" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "escaped.txt").exists()
    # Listed and removed, the key is shown escaped too (it was printed raw on stdout).
    for argv in (("ls", "-r", "oss://bkt/esc/"), ("rm", "-r", "--dry-run", "oss://bkt/esc/")):
        res = cli("storage", *argv)
        assert res.returncode == 0, res.stderr
        assert "\x1b" not in res.stdout and "oss://bkt/esc/a\\x1b[2Jb" in res.stdout, argv


def test_no_agent_running_is_named(s3: Any, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[credentials]\nsocket_path = "{tmp_path / "none.sock"}"\n'
        f'[storage]\nendpoint = "{s3.url}"\npath_style = true\n'
    )
    res = Cli(config)("storage", "ls", "oss://bkt/")
    assert res.returncode == 3
    assert "is the agent running?" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cp_r_of_an_object_copies_it_into_the_directory(cli: Cli, tmp_path: Path,
                                                        s3: Any) -> None:
    boto(s3.url).put_object(Bucket="bkt", Key="d/one.txt", Body=b"just me")
    out = tmp_path / "out"
    got = cli("storage", "cp", "-r", "oss://bkt/d/one.txt", f"{out}/")
    assert got.returncode == 0, got.stderr
    assert (out / "one.txt").read_bytes() == b"just me"
    assert "1 file(s) copied" in got.stderr
    # The prefix form still copies the tree.
    tree = cli("storage", "cp", "-r", "oss://bkt/d", str(tmp_path / "tree"))
    assert tree.returncode == 0, tree.stderr
    assert (tmp_path / "tree" / "one.txt").read_bytes() == b"just me"


def test_cp_r_of_nothing_is_named(cli: Cli, tmp_path: Path) -> None:
    got = cli("storage", "cp", "-r", "oss://bkt/nothing", str(tmp_path / "out"))
    assert got.returncode == 1
    assert "oss://bkt/nothing: no such object or prefix" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mount_of_a_missing_bucket_is_named_before_rclone(cli: Cli, tmp_path: Path) -> None:
    # A fixed TCP port (never reached: the bucket is checked first) so the mount's own
    # settings pass; rclone would say only "directory not found".
    text = cli.config.read_text().replace(
        "[credentials]\n", "[credentials]\ntcp_enabled = true\ntcp_port = 9\n")
    cli.config.write_text(text + f'[daemon]\nrun_dir = "{tmp_path / "run"}"\n')
    dest = tmp_path / "mnt"
    got = cli("storage", "mount", "oss://no-such-bucket/in/", str(dest))
    assert got.returncode == 1, got.stderr
    assert "no such bucket: no-such-bucket" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1
    assert not dest.exists() and not (tmp_path / "run" / "storage" / "mounts").exists()
