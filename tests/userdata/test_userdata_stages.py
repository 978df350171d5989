"""First boot in two stages: local (configuration) then final (scripts, runcmd), each
recorded with its times; one lock for every apply; scripts under --root run chrooted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from ud_cases import apply_cli, one_clean_line, snapshot

from guestagent.cli import main
from guestagent.userdata import stages

DOC = (
    b'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
    b"--XX\nContent-Type: text/cloud-config\n\n#cloud-config\n"
    b"ntp: {servers: [ntp1.aliyun.com]}\n"
    b"runcmd:\n - cp /etc/chrony/chrony.conf /runcmd-saw\n"
    b"--XX\nContent-Type: text/x-shellscript\n\n"
    b"#!/bin/sh\ncat /etc/chrony/chrony.conf > /script-saw\n--XX--\n"
)


def _record(root: Path, stage: str) -> dict[str, Any]:
    data = stages.read(root / "var/lib/guestagent", stage)
    assert data is not None, f"no record of stage {stage}"
    return data


def test_local_configures_and_final_runs_the_commands(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert apply_cli(image_root, DOC, tmp_path, "--stage", "local") == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "handler ntp: applied" in out and "script" not in out and "runcmd" not in out
    assert "ntp1.aliyun.com" in (image_root / "etc/chrony/chrony.conf").read_text()
    assert not (image_root / "script-saw").exists() and not (image_root / "runcmd-saw").exists()
    local = _record(image_root, "local")
    assert local["stage"] == "local" and local["instance_id"] == "i-holes"
    assert [o["name"] for o in local["outcomes"]] == ["ntp"]

    assert apply_cli(image_root, DOC, tmp_path, "--stage", "final") == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "runcmd: applied" in out and "script part-002: applied" in out and "ntp" not in out
    # The commands saw what the local stage configured (chrooted: the image's file).
    conf = (image_root / "etc/chrony/chrony.conf").read_text()
    assert (image_root / "script-saw").read_text() == conf
    assert (image_root / "runcmd-saw").read_text() == conf
    final = _record(image_root, "final")
    assert local["started_at"] <= local["finished_at"] <= final["started_at"]
    assert final["started_at"] <= final["finished_at"]
    assert sorted(o["name"] for o in final["outcomes"]) == ["part-002", "runcmd"]

    # The same instance again: nothing runs twice.
    for stage in ("local", "final"):
        assert apply_cli(image_root, DOC, tmp_path, "--stage", stage) == 0
    assert ": applied" not in capsys.readouterr().out


def test_a_final_stage_alone_configures_nothing(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (image_root / "etc/chrony/chrony.conf").read_text()
    assert apply_cli(image_root, DOC, tmp_path, "--stage", "final") == 0
    assert (image_root / "etc/chrony/chrony.conf").read_text() == before
    assert (image_root / "script-saw").read_text() == before


def test_a_document_is_refused_whole_in_either_stage(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = DOC.replace(b"ntp1.aliyun.com", b"'fe80::1%eth0 x'")
    before = snapshot(image_root, times=True)
    for stage in ("local", "final"):
        assert apply_cli(image_root, bad, tmp_path, "--stage", stage) == 2
        assert "zone id" in one_clean_line(capsys.readouterr().err)
    assert snapshot(image_root, times=True) == before


def test_one_apply_at_a_time(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = image_root / "var/lib/guestagent"
    with stages.apply_lock(state):
        before = snapshot(image_root, times=True)
        rc = apply_cli(image_root, DOC, tmp_path)
        line = one_clean_line(capsys.readouterr().err)
        assert rc == 2
        assert f"another user-data apply is running (pid {os.getpid()})" in line
        assert snapshot(image_root, times=True) == before
    assert apply_cli(image_root, DOC, tmp_path) == 0


def test_scripts_under_root_run_chrooted(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = b"#!/bin/sh\ncat /etc/os-release > /seen\necho $GUESTAGENT_ROOT > /root-var\n"
    assert apply_cli(image_root, doc, tmp_path) == 0, capsys.readouterr().err
    assert (image_root / "seen").read_text() == (image_root / "etc/os-release").read_text()
    assert (image_root / "root-var").read_text() == "\n"
    assert not Path("/seen").exists()


def test_no_shell_in_the_image_is_refused_before_anything_changes(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sh in image_root.rglob("sh"):
        if sh.parent.name == "bin":
            sh.unlink()
    before = snapshot(image_root, times=True)
    for doc in (DOC, b"#cloud-config\nruncmd: [touch /x]\n"):
        assert apply_cli(image_root, doc, tmp_path) == 2
        line = one_clean_line(capsys.readouterr().err)
        assert "run chrooted into the image, which has no /bin/sh; use --no-scripts" in line
    assert snapshot(image_root, times=True) == before
    assert apply_cli(image_root, DOC, tmp_path, "--no-scripts") == 0


@pytest.fixture
def metadata_env(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GUESTAGENT_METADATA_URL", emulator.url)
    monkeypatch.setenv("GUESTAGENT_METADATA_RETRIES", "0")
    monkeypatch.setenv("GUESTAGENT_USERDATA_METADATA_WAIT", "60")
    return emulator


def test_a_stage_waits_for_the_metadata_service(
    metadata_env: Any, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metadata_env.set_user_data(b"#cloud-config\nntp: {servers: [ntp1.aliyun.com]}\n")
    metadata_env.add_fault("meta-data/instance-id", "status", status=503, count=3)
    rc = main(["userdata", "apply", "--root", str(image_root), "--stage", "local"])
    assert rc == 0, capsys.readouterr().err
    assert "ntp1.aliyun.com" in (image_root / "etc/chrony/chrony.conf").read_text()

    # By hand (no stage), an unreachable service is said at once: exit 3.
    metadata_env.add_fault("meta-data/instance-id", "status", status=503, count=1)
    rc = main(["userdata", "apply", "--root", str(image_root)])
    assert rc == 3 and one_clean_line(capsys.readouterr().err)


def test_the_daemon_leaves_user_data_to_the_units(
    metadata_env: Any, image_root: Path
) -> None:
    import threading

    from guestagent import config
    from guestagent.metadata.client import MetadataClient
    from guestagent.userdata.service import FINAL_UNIT, FirstBootService

    wants = image_root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / FINAL_UNIT).symlink_to(f"/etc/systemd/system/{FINAL_UNIT}")
    metadata_env.set_user_data(b"#!/bin/sh\ntouch /ran\n")
    client = MetadataClient.from_url(metadata_env.url)
    try:
        svc = FirstBootService(config.load(), client, root=image_root)
        svc.run(threading.Event())
    finally:
        client.close()
    assert svc.healthy() and svc.status() == {"left_to": FINAL_UNIT}
    assert not (image_root / "ran").exists()
    assert json.dumps(svc.status())
