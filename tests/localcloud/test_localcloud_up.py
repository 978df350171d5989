"""``guestagent localcloud up``: one command starts the local cloud and prints its
environment; ``guestagent run`` never loads any of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest


def _up(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "guestagent", "localcloud", "up", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env)


def _exports(proc: subprocess.Popen[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("# local cloud up"):
            return env
        assert line.startswith("export "), line
        key, _, value = line[len("export "):].strip().partition("=")
        env[key] = value
    raise AssertionError(f"localcloud up ended early: {proc.stderr.read() if proc.stderr else ''}")


def test_up_prints_a_usable_environment_and_stops_cleanly(tmp_path: Path) -> None:
    proc = _up("--workdir", str(tmp_path), cwd=tmp_path)
    try:
        env = _exports(proc)
        with urllib.request.urlopen(env["GUESTAGENT_METADATA_URL"] +
                                    "/latest/dynamic/instance-identity/document", timeout=5) as r:
            assert json.loads(r.read())["instance-id"]
        # The printed environment is what the agent's own CLI uses.
        out = subprocess.run([sys.executable, "-m", "guestagent", "metadata", "get",
                              "meta-data/instance-id"], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=30)
        assert out.returncode == 0 and out.stdout.strip().startswith("i-")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_up_with_a_scenario_file(tmp_path: Path) -> None:
    scenario = tmp_path / "instance.toml"
    scenario.write_text('[instance]\ninstance_id = "i-localcloudtest0001"\n')
    proc = _up("--scenario", str(scenario), cwd=tmp_path)
    try:
        env = _exports(proc)
        url = env["GUESTAGENT_METADATA_URL"] + "/latest/meta-data/instance-id"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.read() == b"i-localcloudtest0001"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("how", ["option", "environment"])
def test_up_with_oss_makes_the_buckets_asked_for_and_says_which(how: str,
                                                                 tmp_path: Path) -> None:
    # The environment variable the OSS stand-in documents was not passed to it by `up`.
    import boto3

    names = "my-bucket,other-one"
    if how == "option":
        proc = _up("--with", "oss", "--buckets", names, cwd=tmp_path)
    else:
        proc = _up("--with", "oss", cwd=tmp_path,
                   env={**os.environ, "GUESTAGENT_LOCALCLOUD_BUCKETS": names})
    try:
        env = _exports(proc)
        assert env["GUESTAGENT_LOCALCLOUD_BUCKETS"] == names
        s3 = boto3.client("s3", endpoint_url=env["GUESTAGENT_STORAGE_ENDPOINT"],
                          region_name="us-east-1", aws_access_key_id="any",
                          aws_secret_access_key="any")
        listed = {b["Name"] for b in s3.list_buckets()["Buckets"]}
        assert listed == {"my-bucket", "other-one"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_bad_bucket_name_is_refused_before_anything_starts(tmp_path: Path) -> None:
    proc = _up("--with", "oss", "--buckets", "My_Bucket", "--workdir", str(tmp_path / "w"),
               cwd=tmp_path)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "bad bucket name 'My_Bucket'" in err and err.count("\n") == 1
    assert not (tmp_path / "w" / "oss").exists()


@pytest.mark.parametrize("arg", ["nosuch", "metadata,,bogus"])
def test_unknown_component_is_refused(arg: str, tmp_path: Path) -> None:
    proc = _up("--with", arg, cwd=tmp_path)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "unknown component" in err and err.count("\n") == 1


@pytest.mark.parametrize("scenario", ["missing.toml", "broken.toml"])
def test_a_bad_scenario_is_one_line_before_the_workdir_exists(scenario: str,
                                                              tmp_path: Path) -> None:
    # It was a traceback, after the work directory had been made.
    (tmp_path / "broken.toml").write_text("x = [\n")
    proc = _up("--scenario", str(tmp_path / scenario), "--workdir", str(tmp_path / "w"),
               cwd=tmp_path)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.startswith(f"guestagent: localcloud: --scenario {tmp_path / scenario}: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_the_daemon_never_imports_the_local_cloud() -> None:
    code = ("import sys, guestagent.cli as c; c.build_parser(['run']); "
            "import guestagent.daemon.agent; "
            "bad = [m for m in sys.modules if m.startswith('guestagent.localcloud')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
