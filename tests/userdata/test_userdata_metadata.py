"""User-data fetched from the metadata emulator through MetadataClient: first boot, the
same instance again, a new instance from the same image, defaults, service unreachable."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from ud_cases import template_cases

from guestagent import config
from guestagent.cli import main
from guestagent.metadata.client import MetadataClient
from guestagent.userdata.cli import render_template
from guestagent.userdata.service import FirstBootService


@pytest.fixture
def metadata_env(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GUESTAGENT_METADATA_URL", emulator.url)
    return emulator


def _apply(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    rc = main(["userdata", "apply", "--root", str(root), *extra])
    return rc, capsys.readouterr().out


def test_first_boot_then_same_instance_then_new_instance(
    metadata_env: Any, image_root: Path, ssh_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name, params = template_cases(ssh_key)["sudo-account"]
    metadata_env.set_user_data(render_template(name, params, "shell").encode())
    rc, out = _apply(image_root, capsys)
    assert rc == 0, out
    assert "script part-001: applied" in out
    assert (image_root / "home/ops/.ssh/authorized_keys").read_text() == ssh_key + "\n"
    # Metadata's DNS servers fill in what the user-data left out.
    resolv = (image_root / "etc/resolv.conf").read_text()
    assert "nameserver 100.100.2.136" in resolv

    rc, out = _apply(image_root, capsys)
    assert rc == 0 and ": applied" not in out and "script part-001: skipped" in out

    (image_root / "home/ops/.ssh/authorized_keys").unlink()
    metadata_env.set_instance_id("i-newinstance0001")
    rc, out = _apply(image_root, capsys)
    assert rc == 0 and "script part-001: applied" in out
    assert (image_root / "home/ops/.ssh/authorized_keys").exists()
    assert (image_root / "var/lib/guestagent/userdata/sem/instance-i-newinstance0001").is_dir()


def test_no_user_data_applies_only_defaults(
    metadata_env: Any, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metadata_env.set_user_data(None)
    rc, out = _apply(image_root, capsys, "--dry-run")
    assert rc == 0 and "+nameserver 100.100.2.136" in out
    assert not (image_root / "etc/resolv.conf").exists()


def test_metadata_unreachable_exits_3(
    image_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUESTAGENT_METADATA_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GUESTAGENT_METADATA_RETRIES", "0")
    monkeypatch.setenv("GUESTAGENT_METADATA_TIMEOUT", "0.2")
    rc = main(["userdata", "apply", "--root", str(image_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and err[0].startswith("guestagent: ")


def test_first_boot_service(metadata_env: Any, image_root: Path) -> None:
    metadata_env.set_user_data(b"#cloud-config\nntp: {servers: [ntp1.aliyun.com]}\n")
    settings = config.load()
    client = MetadataClient.from_url(metadata_env.url)
    try:
        svc = FirstBootService(settings, client, root=image_root)
        assert svc.oneshot
        svc.run(threading.Event())
    finally:
        client.close()
    assert svc.healthy()
    assert svc.status() == {"dns": "applied", "ntp": "applied"}
    assert "server ntp1.aliyun.com iburst" in (image_root / "etc/chrony/chrony.conf").read_text()

    metadata_env.set_user_data(b"not user-data at all\n")
    svc2 = FirstBootService(settings, MetadataClient.from_url(metadata_env.url), root=image_root)
    svc2.run(threading.Event())
    assert not svc2.healthy() and "unknown user-data type" in svc2.status()["refused"]
