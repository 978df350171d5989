"""Behaviour cloud-init users rely on: resolv.conf as cloud-init writes it (compared with
cloud-init's own template), NTP clients that are not installed, backups kept out of /etc."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ud_cases import apply_cli, one_clean_line

RESOLV = {
    "nameservers": ["10.0.0.2", "10.0.0.3"],
    "searchdomains": ["a.example", "b.example"],
    "domain": "c.example",
    "sortlist": ["10.0.0.0/255.0.0.0", "192.168.1.1"],
    "options": {"rotate": True, "inet6": False, "timeout": 2, "attempts": 3},
}

CLOUD_INIT_RENDER = """
import json, sys
from cloudinit import templater
from cloudinit.config.cc_resolv_conf import generate_resolv_conf
params = json.loads(sys.argv[1])
generate_resolv_conf("/etc/cloud/templates/resolv.conf.tmpl", params, sys.argv[2])
"""


def _cloud_init_resolv(tmp_path: Path) -> str:
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import cloudinit.templater"], capture_output=True)
    if probe.returncode != 0 or not Path("/etc/cloud/templates/resolv.conf.tmpl").exists():
        pytest.skip("cloud-init is not installed (Debian: cloud-init)")
    out = tmp_path / "cloud-init-resolv.conf"
    subprocess.run([python, "-c", CLOUD_INIT_RENDER, json.dumps(RESOLV), str(out)],
                   check=True, timeout=120, capture_output=True)
    return out.read_text()


def _meaning(text: str) -> list[str]:
    """What the resolver reads: directive lines, in order, words normalised."""
    return [" ".join(ln.split()) for ln in text.splitlines() if ln.strip() and
            not ln.lstrip().startswith(("#", ";"))]


def test_resolv_conf_reads_as_cloud_init_writes_it(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = _cloud_init_resolv(tmp_path)
    doc = "#cloud-config\nmanage_resolv_conf: true\nresolv_conf: " + json.dumps(RESOLV) + "\n"
    assert apply_cli(image_root, doc.encode(), tmp_path) == 0
    ours = (image_root / "etc/resolv.conf").read_text()
    assert _meaning(ours) == _meaning(peer)
    assert _meaning(ours)[2:4] == ["search a.example b.example", "domain c.example"]
    # glibc keeps the last of search/domain: the user is told the search list is lost.
    warning = one_clean_line(capsys.readouterr().err)
    assert "domain and searchdomains both given" in warning


def test_an_ntp_client_that_is_not_installed_is_refused(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = b"#cloud-config\nntp: {ntp_client: ntp, servers: [ntp1.aliyun.com]}\n"
    assert apply_cli(image_root, doc, tmp_path) == 2
    line = one_clean_line(capsys.readouterr().err)
    assert "ntp.ntp_client: ntp is not installed in the image" in line and "ntpsec" in line
    assert not (image_root / "etc/ntp.conf").exists()


def test_no_ntp_client_at_all_is_a_warning_not_a_silent_success(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(image_root / "etc/chrony")
    doc = b"#cloud-config\nntp: {servers: [ntp1.aliyun.com]}\n"
    assert apply_cli(image_root, doc, tmp_path) == 0
    warning = one_clean_line(capsys.readouterr().err)
    assert "no NTP client is installed" in warning and "/etc/chrony.conf" in warning
    assert "ntp1.aliyun.com" in (image_root / "etc/chrony.conf").read_text()
    record = json.loads((image_root / "var/lib/guestagent/userdata/last-run.json").read_text())
    assert any("no NTP client" in w for w in record["warnings"])


def test_backups_go_to_the_state_directory(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image_root / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    (image_root / "etc/resolv.conf").chmod(0o640)
    doc = b"#cloud-config\nmanage_resolv_conf: true\nresolv_conf: {nameservers: [10.0.0.2]}\n"
    assert apply_cli(image_root, doc, tmp_path) == 0
    backup = image_root / "var/lib/guestagent/userdata/backup/etc/resolv.conf"
    assert backup.read_text() == "nameserver 192.0.2.1\n"
    assert backup.stat().st_mode & 0o777 == 0o640
    assert (backup.parents[1].stat().st_mode & 0o777) == 0o700  # backup/ itself
    assert not [p for p in (image_root / "etc").rglob("*") if "bak" in p.name]
